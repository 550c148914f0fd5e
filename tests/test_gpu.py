"""On the GPU: the ops captured on the CPU are the ops the engine launches, and the SDPA kernels that ground truth
is recorded on take the engine's float mask.

For each model, the engine (transformers continuous batching, random weights, the model cut to two layers) serves
three prompts, each for three new tokens; every step's ops are recorded at the dispatcher and compared with the
model's golden IR evaluated at that step's T, R, K: op names and input shapes, each IR op expected `count` times
(its layer count scaled to the cut model). Marked `gpu`: skipped where torch sees no CUDA device (conftest).
"""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import ROOT, zoo_data

from dooly.ir import When, loads
from dooly.ir.expr import evaluate

pytestmark = pytest.mark.gpu

LAYERS = 2
PROMPTS = (37, 300, 5)
NEW_TOKENS = 3


def recorder():
    """A dispatch mode that records (op name, input shapes) of every op that launches a kernel."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from dooly.capture.lower import NO_KERNEL, op_name

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace != "prim" and str(func.overloadpacket) not in NO_KERNEL:
                shapes = [tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                self.ops.append((op_name(func), shapes))
            return out

    return Record()


def engine_steps(name: str) -> list[dict]:
    """The ops of each step the engine runs: [{T, R, K, Ks, ops}]."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    from dooly.bench.engine import model_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(model_config(zoo_data(name), LAYERS), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    steps = []
    original = ModelRunner.compute_batch

    def compute_batch(self, model, batch_data):
        io = self.inputs_and_outputs
        totals = dict(io.total_seqlen_k)
        rec = recorder()
        with rec:
            original(self, model, batch_data)
        steps.append({"T": io.num_q_tokens, "R": io.num_request_in_batch, "K": totals.get("full_attention"),
                      "Ks": totals.get("sliding_attention"), "ops": rec.ops})

    ModelRunner.compute_batch = compute_batch
    try:
        inputs = [[(i * 7 + j) % 1000 + 5 for j in range(n)] for i, n in enumerate(PROMPTS)]
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
        model.generate_batch(inputs, generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(),
                             progress_bar=False)
    finally:
        ModelRunner.compute_batch = original
    return steps


def pool_free(name: str, shapes: tuple) -> tuple:
    """The KV-cache pool's size is the engine's memory-sized choice, not the model's: left out of the comparison."""
    if name in ("aten.index_copy_", "aten.index_select"):
        return ((-1, *shapes[0][1:]), *shapes[1:])
    return shapes


def expected(ir, step: dict) -> Counter:
    """The IR's ops at a step's sizes: (name, input shapes) -> count, layer counts scaled to LAYERS layers."""
    env = {**ir.config_values, **{k: v for k, v in step.items() if k in ("T", "R", "K", "Ks") and v is not None}}
    env.setdefault("Ks", env.get("K"))
    reads = env["K"] > env["T"]
    out = Counter()
    for op in ir.ops:
        if op.scope.startswith("engine.reset") or op.scope.startswith("engine.attention_mask"):
            continue  # built in prepare_batch_tensors, outside the recorded forward
        if (op.when is When.PAST_KEYS and not reads) or (op.when is When.NO_PAST_KEYS and reads):
            continue
        count = op.count * LAYERS // ir.meta.layers if "layers.*" in op.scope else op.count
        shapes = tuple(tuple(int(evaluate(d.expr, env)) for d in t.shape) for t in op.inputs)
        out[(op.name, pool_free(op.name, shapes))] += count
    return out


def launched(step: dict) -> Counter:
    """The step's recorded ops, the SDPA kernel torch picked named as the IR names the call."""
    out = Counter()
    for name, shapes in step["ops"]:
        if name.startswith("aten._scaled_dot_product") or name == "aten.scaled_dot_product_attention":
            name, shapes = "aten.scaled_dot_product_attention", shapes[:4]
        out[(name, pool_free(name, tuple(shapes)))] += 1
    return out


@pytest.mark.parametrize("name", ["llama-3.2-1b", "gemma-2-2b"])
def test_the_engine_launches_the_ops_captured_on_the_cpu(name):
    ir = loads((ROOT / "golden" / f"{name}.ir").read_text())
    steps = engine_steps(name)
    assert any(step["K"] > step["T"] for step in steps)  # decode steps, which read the cache, were recorded
    for step in steps:
        want, got = expected(ir, step), launched(step)
        assert want == got, (f"T={step['T']} R={step['R']} K={step['K']}: missing {list((want - got).items())[:20]}, "
                             f"extra {list((got - want).items())[:20]}")


@pytest.mark.parametrize("kernel", ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
@pytest.mark.parametrize("t", [1, 512, 4096])
def test_sdpa_kernels_that_profile_forces_take_the_engines_float_mask(kernel, t):
    """The engine's call (bf16, a float `[1, 1, T, K]` mask, no causal flag) runs on each kernel that
    `dooly groundtruth --backend` forces (flash attention refuses a float mask: no ground truth is recorded on it)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, t, 128, dtype=torch.bfloat16, device="cuda")
    kv = torch.randn(1, 32, 4096, 128, dtype=torch.bfloat16, device="cuda")
    mask = torch.zeros(1, 1, t, 4096, dtype=torch.bfloat16, device="cuda")
    with sdpa_kernel([getattr(SDPBackend, kernel)]):
        out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)
    torch.cuda.synchronize()
    assert out.shape == q.shape and torch.isfinite(out).all()
