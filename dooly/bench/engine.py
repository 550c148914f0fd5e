"""transformers' continuous-batching engine, run for real (random weights) and timed step by step.

Used twice, on the GPU: to calibrate the engine's host-side time per step on small synthetic models (the
per-environment host model of `dooly.predict`), and by `dooly groundtruth` to record ground truth on zoo models.
The engine runs its own loop in its own thread; hooks on its batch processor record, for every step, the batch
composition and the time of each phase: `prepare_next_batch` (scheduling and input preparation on the host),
the model forward (CUDA events on the engine's compute stream around `ModelRunner.compute_batch`), and
`update_batch` (reading the new tokens back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .traces import admission_order


@dataclass
class MeasuredStep:
    queries: list[int]  # query tokens of each request in the batch
    keys: list[int]  # keys each request attends to (past + new)
    keys_sliding: list[int] | None
    prepare_s: float
    launch_s: float  # host time to launch the forward (compute_batch returning)
    forward_s: float  # the forward on the GPU (events)
    step_s: float  # _generation_step, launch to synchronised outputs
    update_s: float
    start: float  # perf_counter at the start of prepare

    @property
    def T(self) -> int:
        return sum(self.queries)

    @property
    def R(self) -> int:
        return len(self.queries)

    @property
    def K(self) -> int:
        return sum(self.keys)


@dataclass
class Result:
    request_id: str
    prompt: int
    output: int
    arrival: float  # seconds after the run started
    first_token: float  # seconds after the run started
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def model_config(data: dict, layers: int | None = None):
    from transformers import AutoConfig

    data = dict(data)
    if layers is not None:
        data["num_hidden_layers"] = layers
        if isinstance(data.get("layer_types"), list):
            data["layer_types"] = data["layer_types"][:layers]
    return AutoConfig.for_model(data.pop("model_type"), **data)


class Engine:
    def __init__(self, data: dict, layers: int | None = None, cb: dict | None = None, device: str = "cuda",
                 sdpa_kernel: str | None = None, seed: int = 0):
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        torch.manual_seed(seed)
        config = model_config(data, layers)
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").eval()
        self.cb = ContinuousBatchingConfig(**(cb or {}))
        self.gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=16)
        self.device, self.sdpa_kernel = device, sdpa_kernel
        self.steps: list[MeasuredStep] = []
        self.runs = 0

    def close(self) -> None:
        """Let go of the model, and with it the engine's manager and KV cache, and give their GPU memory back."""
        import gc

        self.model = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def resolved_config(self) -> dict:
        """The engine's ContinuousBatchingConfig as it resolved it at run time (cache size, batch limits, graphs)."""
        manager = getattr(self.model, "_cached_continuous_batching_manager", None)
        config = manager.continuous_batching_config if manager is not None else self.cb
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()
                if isinstance(v, (int, float, str, bool, tuple, type(None)))}

    def _hook(self, processor) -> None:
        """Wrap the processor's phases to time them (the instance's methods only: the engine's code runs as is)."""
        engine, io = self, processor.inputs_and_outputs
        prepare, generation_step, update = (processor.prepare_next_batch, processor._generation_step,
                                            processor.update_batch)
        runner = processor.model_runner
        compute = runner.compute_batch
        current: dict = {}
        cuda = self.device == "cuda"

        def timed_prepare():
            start = time.perf_counter()
            ready = prepare()
            if ready:
                reqs = io.requests_in_batch
                current.update(start=start, prepare_s=time.perf_counter() - start,
                               queries=[r.query_length for r in reqs],
                               keys=[r.state.position_offset for r in reqs],
                               sliding=(None if "sliding_attention" not in io.cumulative_seqlens_k else
                                        _window_keys(reqs, processor.cache)))
            return ready

        def timed_compute(model, batch_data):
            stream = io.compute_stream
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record(stream)
            t = time.perf_counter()
            compute(model, batch_data)
            current["launch_s"] = time.perf_counter() - t
            if cuda:
                end.record(stream)
                current["events"] = (begin, end)

        def timed_step(model):
            t = time.perf_counter()
            generation_step(model)
            current["step_s"] = time.perf_counter() - t

        def timed_update():
            t = time.perf_counter()
            update()
            events = current.pop("events", None)
            forward = events[0].elapsed_time(events[1]) / 1e3 if events else current["step_s"]
            engine.steps.append(MeasuredStep(current["queries"], current["keys"], current["sliding"],
                                             current["prepare_s"], current["launch_s"], forward, current["step_s"],
                                             time.perf_counter() - t, current["start"]))

        processor.prepare_next_batch, processor._generation_step = timed_prepare, timed_step
        processor.update_batch, runner.compute_batch = timed_update, timed_compute

    def run(self, requests: list[tuple[float, int, int]],
            timeout: float = 600.0) -> tuple[list[MeasuredStep], list[Result]]:
        """Serve `requests` (arrival s, prompt tokens, output tokens) in real time; returns the steps it ran and
        each request's timing (from the engine's own token timestamps). Runs reuse one manager, its cache and its
        batch processor, as a serving process would."""
        import contextlib

        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

        self.steps = []
        self.runs += 1
        manager = self.model.init_continuous_batching(generation_config=self.gen, continuous_batching_config=self.cb)
        hooked = ContinuousBatchProcessor.__init__
        engine = self

        def init(processor, *args, **kwargs):
            hooked(processor, *args, **kwargs)
            engine._hook(processor)

        ContinuousBatchProcessor.__init__ = init
        kernel = contextlib.nullcontext()
        if self.sdpa_kernel:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel([getattr(SDPBackend, self.sdpa_kernel)])
        results = {}
        vocab = self.model.config.vocab_size
        try:
            with kernel:  # SDPA's backend switches are process-wide: the engine's thread sees them
                manager.start()
                start = time.perf_counter()
                for i in admission_order(requests):
                    arrival, prompt, output = requests[i]
                    delay = start + arrival - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    # token ids differ between requests and between runs: no prompt hits the engine's prefix cache
                    ids = [(self.runs * 7919 + i * 131 + j * 7) % (vocab - 10) + 10 for j in range(prompt)]
                    rid = manager.add_request(ids, request_id=f"r{i}", max_new_tokens=output, record_timestamps=True)
                    results[rid] = (arrival, prompt, output)
                done = {}
                deadline = time.perf_counter() + timeout
                while len(done) < len(results) and time.perf_counter() < deadline:
                    out = manager.get_result(timeout=1)
                    if out is not None and out.is_finished():
                        done[out.request_id] = out
        finally:
            manager.stop(block=True, keep_for_next_session=True)
            ContinuousBatchProcessor.__init__ = hooked
        origin = start
        rows = []
        for rid, out in done.items():
            _, prompt, output = results[rid]
            stamps = [t - origin for t in (out.timestamps or [])]
            rows.append(Result(rid, prompt, output, out.created_time - origin, stamps[0] if stamps else float("nan"),
                               stamps))
        return self.steps, rows


def _window_keys(reqs, cache) -> list[int]:
    window = cache.config.sliding_window
    return [r.query_length + min(r.state.position_offset - r.query_length, window - 1) for r in reqs]
