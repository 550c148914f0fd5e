"""The simulator: workloads, the two schedulers' invariants, request timing with known step times, what the
engine's settings do to a step, the engine's cache sizing, and `dooly simulate`."""

import json
import math

import numpy as np
import pytest
from helpers import ROOT, dooly

from dooly.config import load_config
from dooly.errors import DoolyError
from dooly.predict.host import HostModel
from dooly.predict.step import Forward, Step, compose_step
from dooly.sim import (
    ContinuousBatching,
    EngineSettings,
    Request,
    StepTime,
    VLLMv1,
    load_trace,
    simulate,
    summary,
    synthetic,
)
from dooly.sim.transformers_cache import cache_size


class Recorder:
    """A step time that records every batch: `base` seconds plus `per_token` per query token."""

    def __init__(self, base=0.01, per_token=0.0):
        self.base, self.per_token, self.batches = base, per_token, []

    def __call__(self, batch):
        self.batches.append(batch)
        return self.base + self.per_token * sum(q for q, _ in batch)


def test_one_request_alone():
    out = simulate([Request(0, 0.5, 100, 10)], ContinuousBatching(100, 16), Recorder(base=1.0))
    (r,) = out.requests
    assert r["ttft"] == pytest.approx(1.0) and r["tpot"] == pytest.approx(1.0) and r["e2e"] == pytest.approx(10.0)
    assert len(out.steps) == 10


@pytest.mark.parametrize("make", [
    lambda: ContinuousBatching(num_blocks=120, block_size=16, max_batch_tokens=256, max_requests_per_batch=8),
    lambda: VLLMv1(num_blocks=120, block_size=16, max_num_batched_tokens=256, max_num_seqs=8),
])
def test_schedulers_respect_their_limits_and_finish_every_request(make):
    requests = synthetic("poisson:rate=50,n=60,prompt=lognormal:120:0.6,output=lognormal:40:0.5", seed=3)
    assert max(r.prompt + r.output for r in requests) < 120 * 16 / 2  # the cache holds any two requests
    scheduler, step = make(), Recorder()
    out = simulate(requests, scheduler, step)
    for batch in step.batches:
        assert sum(q for q, _ in batch) <= 256 and len(batch) <= 8
        assert all(1 <= q <= k for q, k in batch)
    assert scheduler.blocks.free == scheduler.blocks.total  # every block came back
    assert len(out.requests) == 60
    assert all(r["ttft"] > 0 and r["e2e"] >= r["ttft"] for r in out.requests)


def test_a_tight_cache_preempts_and_recomputes_in_vllm():
    requests = [Request(i, 0.0, 200, 100) for i in range(6)]
    scheduler, step = VLLMv1(num_blocks=60, block_size=16, max_num_batched_tokens=1024), Recorder()
    out = simulate(requests, scheduler, step)
    prefilled = sum(q for b in step.batches for q, k in b if q > 1)
    assert prefilled > 6 * 200  # someone was evicted and prefilled again
    assert all(r["e2e"] > 0 for r in out.requests)


def test_a_request_bigger_than_the_cache_is_a_clear_error():
    with pytest.raises(DoolyError, match="more KV cache"):
        simulate([Request(0, 0.0, 10_000, 5)], ContinuousBatching(4, 16), Recorder())


def test_summary_statistics():
    out = simulate([Request(i, float(i), 10, 5) for i in range(5)], ContinuousBatching(100, 16), Recorder(base=0.1))
    s = summary(out)
    assert s["requests"] == 5 and s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["throughput_tok_s"] == pytest.approx(25 / (4 + 0.5))


def test_workload_parsing(tmp_path):
    reqs = synthetic("poisson:rate=inf,n=5,prompt=7,output=3")
    assert [(r.arrival, r.prompt, r.output) for r in reqs] == [(0.0, 7, 3)] * 5
    assert synthetic("poisson:rate=2,n=50,prompt=lognormal:100:1", seed=1) == synthetic(
        "poisson:rate=2,n=50,prompt=lognormal:100:1", seed=1)
    for bad in ("uniform:n=3", "poisson:n=0", "poisson:rate=x", "poisson:prompt=-3", "poisson:speed=2"):
        with pytest.raises(DoolyError):
            synthetic(bad)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0.5, "prompt": 10, "output": 2}\n{"arrival_time": 0.1, "prompt_tokens": 3, '
                     '"output_tokens": 1}\n')
    assert [(r.arrival, r.prompt) for r in load_trace(trace)] == [(0.1, 3), (0.5, 10)]
    for line in ('{"arrival": 0, "prompt": 1.5, "output": 2}', '{"arrival": -1, "prompt": 1, "output": 2}', "[1, 2]"):
        trace.write_text(line + "\n")
        with pytest.raises(DoolyError):
            load_trace(trace)


FAKE_HOST = HostModel(prepare=np.array([1_000.0, 0, 0, 0, 0]), launch=np.zeros(2), update=np.zeros(2),
                      plan_us=5_000.0, step_extra=0.0, rows=0)


class FakePredictor:
    """Every step: 10 ms of GPU, 1 ms of host, a 5 ms plan stall for each attention shape new to the engine."""

    def step(self, batch, planned=frozenset(), forward=Forward.EAGER, overlap_host=False):
        shapes = {(sum(q for q, _ in batch), sum(k for _, k in batch))}
        parts = compose_step(FAKE_HOST, 10_000.0, 0.0, len(shapes - planned), len(batch), 0, 0, 1, forward,
                             overlap_host)
        return Step(parts, shapes)


def test_attention_plans_are_paid_once_per_shape_and_run():
    step = StepTime(FakePredictor(), EngineSettings())
    assert step([(1, 10)]) == pytest.approx(0.016)
    assert step([(1, 10)]) == pytest.approx(0.011)  # same shape: the plan is cached
    assert step([(1, 11)]) == pytest.approx(0.016)
    assert StepTime(FakePredictor(), EngineSettings())([(1, 10)]) == pytest.approx(0.016)  # a new run starts cold


def test_cuda_graphs_capture_each_padded_shape_once_then_replay():
    step = StepTime(FakePredictor(), EngineSettings(use_cuda_graph=True, q_padding_interval_size=64))
    first = step([(1, 10), (1, 20)])
    again = step([(1, 11), (1, 21), (1, 5)])  # pads to the same 64 queries and 16384 keys
    assert first > again == pytest.approx((1_000 + 10_000 + 30) * 1e-6)
    async_step = StepTime(FakePredictor(), EngineSettings(use_async_batching=True))
    assert async_step([(1, 10)]) == pytest.approx(0.015)  # host work hides under the forward


def test_cache_size_is_what_the_engine_resolved_on_the_h100():
    for path in sorted((ROOT / "data" / "groundtruth" / "sdpa").glob("*.json")):
        truth = json.loads(path.read_text())
        got = cache_size(load_config(ROOT / "configs" / f"{truth['model']}.json")).num_blocks
        resolved = truth["cb_config"]["num_blocks"]
        assert resolved <= got <= resolved * 1.04, truth["model"]




def test_simulate_writes_requests_summary_and_plots(shipped, tmp_path):
    out = tmp_path / "sim"
    r = dooly("simulate", ROOT / "configs" / "llama-3.2-1b.json", "--store", shipped, "--synthetic",
              "poisson:rate=20,n=200,prompt=lognormal:256:0.5,output=32", "--json", "--out", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["requests"] == 200
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        stats = result[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert result["throughput_tok_s"] > 0
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(row["e2e_ms"] >= row["ttft_ms"] > 0 for row in rows)
    assert (out / "latency_cdf.png").stat().st_size > 0 and (out / "batch_size.png").stat().st_size > 0
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["num_blocks"] > 1000 and settings["scheduler"] == "cb"


def test_simulate_refuses_bad_input_in_one_line(shipped, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt": -5, "output": 2}\n')
    for args in (["--synthetic", "poisson:rate=1,n=-3"], ["--trace", trace],
                 ["--synthetic", "poisson:n=3", "--num-blocks", "0"]):
        r = dooly("simulate", ROOT / "configs" / "llama-3.2-1b.json", "--store", shipped, *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_simulate_a_vllm_ir_serves_it_with_vllms_scheduler_and_its_compiled_step(tmp_path):
    from dooly.compile import load_model
    from dooly.predict.vllm_step import step_model
    from dooly.store import Store

    out = tmp_path / "sim"
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt": 300, "output": 4}\n')
    r = dooly("simulate", ROOT / "data" / "vllm-ir" / "llama-3.1-8b.ir", "--store", ROOT / "data" / "h200.sqlite",
              "--trace", trace, "--num-blocks", 1000, "--max-batch-tokens", 2048, "--json", "--out", out)
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["scheduler"] == "vllm" and settings["environment"].endswith("/vllm-0.24.0/bf16/FLASH_ATTN")
    row = json.loads((out / "requests.jsonl").read_text())
    model = step_model(load_model(ROOT / "data" / "vllm-ir" / "llama-3.1-8b.ir"),
                       Store(ROOT / "data" / "h200.sqlite", readonly=True), "FLASH_ATTN")
    # one request: taken in, a 300-token prefill step on the idle GPU, then three decode steps of its growing
    # context, each entered by the host once it has launched the last and processed the output of the one before
    steps = [[(300, 300)], [(1, 301)], [(1, 302)], [(1, 303)]]
    host, gpu = model.admit_us(1), -math.inf
    for batch in steps:
        end = max(host, gpu) + model.span_us(batch, gpu - host)
        host, gpu = max(host + model.launch_us(batch[0][0], 1), gpu) + model.rest_us(1), end
        if batch == steps[0]:
            first = end
    assert model.admit_us(1) > 0
    assert row["e2e_ms"] == pytest.approx(gpu / 1e3, rel=1e-6)
    # with async scheduling its first token is read once the prefill's GPU work ends and the next step is launched
    assert first / 1e3 <= row["ttft_ms"] < row["e2e_ms"]


def test_a_first_token_is_read_when_its_step_ends_or_once_the_host_has_launched_the_next():
    """With asynchronous scheduling the host launches step N+1 before it waits on step N's output."""
    from dooly.sim.simulator import Outcome, seen_when_read

    steps = [{"start": 0.0, "time": 0.010, "requests": 1, "tokens": 200},  # GPU-bound: launched in 6 + 1 ms
             {"start": 0.010, "time": 0.015, "requests": 1, "tokens": 1},
             {"start": 0.015, "time": 0.017, "requests": 2, "tokens": 100},  # host-bound: 1.5 + 1 ms to launch
             {"start": 0.017, "time": 0.019, "requests": 2, "tokens": 2},
             {"start": 0.028, "time": 0.030, "requests": 1, "tokens": 300}]  # the last: nothing follows
    launch = {200: 0.006, 1: 0.001, 100: 0.0015, 2: 0.001, 300: 0.001}
    rows = [{"arrival": 0.0, "ttft": 0.010}, {"arrival": 0.015, "ttft": 0.002}, {"arrival": 0.025, "ttft": 0.005}]
    seen = seen_when_read(Outcome(rows, steps), lambda t, r: launch[t]).requests
    assert seen[0]["ttft"] == pytest.approx(0.010)  # read as the GPU finishes the step
    assert seen[1]["ttft"] == pytest.approx(0.002 + 0.0005)  # read once step 4 is launched, 0.5 ms after step 3
    assert seen[2]["ttft"] == pytest.approx(0.005)


def test_requests_arriving_together_are_taken_in_as_one_batch_before_any_is_scheduled():
    from dooly.sim.schedulers import VLLMv1
    from dooly.sim.simulator import ready_times, simulate
    from dooly.sim.workload import Request

    requests = [Request(0, 0.0, 16, 2), Request(1, 0.0, 16, 2), Request(2, 0.5, 16, 2)]
    admit = {1: 0.001, 2: 0.003}
    assert ready_times(requests, admit.get) == [0.003, 0.003, 0.501]
    assert ready_times(requests, None) == [0.0, 0.0, 0.5]
    plain = simulate(requests, VLLMv1(1000, 16, 2048, 128, False, False), lambda batch: 0.01)
    admitted = simulate(requests, VLLMv1(1000, 16, 2048, 128, False, False), lambda batch: 0.01,
                        admission_s=admit.get)
    for a, b, delay in zip(plain.requests, admitted.requests, (0.003, 0.003, 0.001)):
        assert b["ttft"] == pytest.approx(a["ttft"] + delay)


def test_a_host_running_ahead_of_the_gpu_hides_its_work_unless_the_gpu_idled_or_waits_on_it():
    """With asynchronous scheduling the host enters step N+1 once it has launched N and processed N-1's output: a
    step it enters while the GPU still runs finds its inputs prepared, one after an idle spell waits for them, and
    a host slower than the GPU sets the pace."""
    from dooly.sim.schedulers import VLLMv1
    from dooly.sim.simulator import Host, simulate
    from dooly.sim.workload import Request

    def run(launch_s):
        # a step's GPU work 10 ms, its first kernel 3 ms after the host enters it, its last launch at launch_s
        span = lambda batch, ahead: max(max(ahead, 0.003) + 0.010, launch_s) - max(ahead, 0.0)  # noqa: E731
        requests = [Request(0, 0.0, 16, 3), Request(1, 1.0, 16, 2)]  # the second arrives long after the first ends
        return simulate(requests, VLLMv1(1000, 16, 2048, 128, False, False), span,
                        host=Host(lambda batch: launch_s, lambda batch: 0.002))

    out = run(0.004)
    assert [round(s["time"] - s["start"], 6) for s in out.steps] == [0.013, 0.010, 0.010, 0.013, 0.010]
    assert [r["ttft"] for r in out.requests] == pytest.approx([0.013, 0.013])
    assert out.requests[0]["e2e"] == pytest.approx(0.033)
    slow = run(0.015)  # the host launches a step in 15 ms and processes an output in 2: a step every 17 ms
    starts = [s["start"] for s in slow.steps[:3]]
    assert [round(b - a, 6) for a, b in zip(starts, starts[1:])] == [0.017, 0.017]
    assert [round(s["time"] - s["start"], 6) for s in slow.steps[:3]] == [0.015, 0.015, 0.015]
