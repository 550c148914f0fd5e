"""The request traces that ground truth is recorded on: (arrival s, prompt tokens, output tokens) per request."""

from __future__ import annotations

import random


def admission_order(requests: list) -> list[int]:
    """The indices of a trace's requests in the order transformers' harness adds them: by arrival, those arriving
    together smallest first. Each keeps its index as its name (`r<i>`), which the simulator's replay must follow."""
    return sorted(range(len(requests)), key=lambda i: tuple(requests[i]))


def lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    # e to ten digits, not math.e: the recorded traces were drawn with this constant
    return max(lo, min(hi, int(round(median * pow(2.718281828, rng.gauss(0, sigma))))))


def traces(max_context: int, seed: int = 0) -> dict[str, list[tuple[float, int, int]]]:
    """A ShareGPT-like chat mix and a long-prompt mix, each at a low and a high arrival rate (Poisson), and three
    bursts of requests all arriving at once, whose steps are the same in every run (the scheduler is deterministic
    when arrivals do not race it): step ground truth over mixed batches, long decodes of many requests, and
    contexts up to 30k tokens (or the model's `max_context`)."""
    out, longest = {}, min(30000, max_context - 32)
    for name, n, prompt, output in (
            ("burst", 48, lambda r: lognormal(r, 600, 1.0, 16, 6000), lambda r: r.randint(8, 40)),
            ("decode", 48, lambda r: lognormal(r, 200, 0.8, 16, 1500), lambda r: r.randint(16, 80)),
            ("longctx", 6, lambda r: r.randint(min(4096, longest // 2), longest), lambda r: r.randint(8, 16))):
        rng = random.Random(f"{seed}-{name}")
        out[f"{name}@inf"] = [(0.0, prompt(rng), output(rng)) for _ in range(n)]
    for name, n, rates, prompt, output in (
            ("chat", 32, (8.0, 32.0), lambda r: lognormal(r, 256, 0.9, 16, 3000),
             lambda r: lognormal(r, 28, 0.5, 4, 64)),
            ("long", 8, (2.0, 8.0), lambda r: r.randint(2048, 7168), lambda r: r.randint(12, 24))):
        for rate in rates:
            rng = random.Random(f"{seed}-{name}-{rate}")
            t, reqs = 0.0, []
            for _ in range(n):
                reqs.append((round(t, 4), prompt(rng), output(rng)))
                t += rng.expovariate(rate)
            out[f"{name}@{rate:g}"] = reqs
    return out
