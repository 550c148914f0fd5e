"""Dooly's vLLM scheduler against the real engine on the GPU: for every trace whose requests all arrive at once
(so timing cannot reorder them), the simulator schedules the same steps as vLLM 0.24 did, request by request."""

import json
from pathlib import Path

import pytest

from dooly.sim.schedulers import VLLMv1
from dooly.sim.simulator import simulate
from dooly.sim.workload import Request

ROOT = Path(__file__).resolve().parent.parent
# traces whose runs recorded their steps (the runner hooks saw none of Qwen2.5-7B's: its file holds requests only)
CASES = [(path, name) for path in sorted((ROOT / "data" / "groundtruth" / "vllm").glob("*/*.json"))
         for name, trace in json.loads(path.read_text())["traces"].items()
         if name.endswith("@inf") and all(run["steps"] for run in trace["runs"])]


class Recording(VLLMv1):
    def schedule(self):
        out = super().schedule()
        self.composition = sorted((s.tokens, s.state.cached) for s in out)
        return out


@pytest.mark.parametrize("path,trace", CASES, ids=[f"{p.parent.name}/{p.stem}/{t}" for p, t in CASES])
def test_vllm_scheduler_reproduces_the_engines_steps(path, trace):
    truth = json.loads(path.read_text())
    config, recorded = truth["engine_config"], truth["traces"][trace]
    requests = [Request(i, a, p, o) for i, (a, p, o) in enumerate(recorded["requests"])]
    shared = recorded["shared_prefix"]  # the engine drew the shared prefix once and every other token at random
    tokens = {r.id: [-1 - j for j in range(min(shared, r.prompt))]
              + [(r.id + 1) * 10**6 + j for j in range(r.prompt - min(shared, r.prompt))] for r in requests}
    scheduler = Recording(config["num_gpu_blocks"], config["block_size"], config["max_num_batched_tokens"],
                          config["max_num_seqs"], config["prefix_caching"], config["async_scheduling"],
                          prompt_tokens=tokens)
    steps = []

    def one_step(batch):
        steps.append(scheduler.composition)
        return 1.0

    simulate(requests, scheduler, one_step)
    for run in recorded["runs"]:
        engine = [sorted(zip(s["queries"], s["computed"])) for s in run["steps"]]
        assert engine == steps
