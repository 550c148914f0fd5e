"""Request workloads: a trace file (JSON lines), or a synthetic spec such as
`poisson:rate=5,n=10000,prompt=512,output=128` (`prompt=lognormal:MEAN:SIGMA` draws lognormal lengths around a
median MEAN; `rate=inf` sends everything at once)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DoolyError
from ..limits import Limits, parse_json, read_lines


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float  # seconds
    prompt: int
    output: int


LIMITS = ("requests", "prompt-tokens", "output-tokens", "workload-tokens")


def request(id: int, arrival: float, prompt, output, limits: Limits, where: str) -> Request:
    """A request of user input (a trace line, a ground-truth trace), checked and within `limits`."""
    for name, value in (("prompt", prompt), ("output", output)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DoolyError(f"{where}: {name} must be a positive integer, got {repr(value)[:40]}")
        limits.check(f"{name}-tokens", value, f"{where}: {name} tokens")
    if not math.isfinite(arrival) or arrival < 0:
        raise DoolyError(f"{where}: arrival must be a non-negative number of seconds")
    return Request(id, arrival, prompt, output)


def _lengths(spec: str, what: str, limits: Limits) -> Callable[[random.Random], int]:
    """Lengths drawn from `spec` (an integer, or lognormal:MEDIAN:SIGMA), each within the `what`-tokens limit."""
    name = f"{what}-tokens"
    if spec.startswith("lognormal:"):
        try:
            _, median, sigma = spec.split(":")
            median, sigma = float(median), float(sigma)
        except ValueError:
            raise DoolyError(f"{what}={spec}: expected lognormal:MEDIAN:SIGMA") from None
        if not (math.isfinite(median) and median > 0 and math.isfinite(sigma) and sigma >= 0):
            raise DoolyError(f"{what}={spec}: MEDIAN must be a positive number and SIGMA a non-negative one")

        def draw(rng: random.Random) -> int:
            try:
                length = median * math.exp(rng.gauss(0, sigma))
            except OverflowError:
                length = math.inf
            limits.check(name, length, f"{what}={spec}: a drawn length")
            return max(1, int(round(length)))

        return draw
    try:
        value = int(spec)
    except ValueError:
        raise DoolyError(f"{what}={spec[:40]}: expected a positive integer or lognormal:MEDIAN:SIGMA") from None
    if value < 1:
        raise DoolyError(f"{what} must be positive, got {value}")
    limits.check(name, value, f"{what}={spec}")
    return lambda rng: value


def synthetic(spec: str, seed: int = 0, limits: Limits | None = None) -> list[Request]:
    limits = limits or Limits()
    kind, _, rest = spec.partition(":")
    if kind != "poisson":
        raise DoolyError(f"unknown synthetic workload {kind[:40]!r} (poisson:rate=R,n=N,prompt=P,output=O)")
    try:
        fields = dict(part.split("=", 1) for part in rest.split(",") if part)
    except ValueError:
        raise DoolyError(f"malformed workload {spec[:80]!r}: expected key=value pairs") from None
    unknown = set(fields) - {"rate", "n", "prompt", "output"}
    if unknown:
        raise DoolyError(f"unknown workload field(s) {', '.join(sorted(unknown))[:80]}")
    try:
        rate = float(fields.get("rate", "inf"))
        n = int(fields.get("n", "100"))
    except ValueError:
        raise DoolyError(f"malformed workload {spec[:80]!r}: rate and n must be numbers") from None
    if not rate > 0:  # not `rate <= 0`: a NaN rate is refused too
        raise DoolyError(f"rate must be a positive number of requests a second (inf: all at once), got {rate}")
    if n < 1:
        raise DoolyError(f"n must be a positive number of requests, got {n}")
    limits.check("requests", n, f"workload {spec[:80]!r}: requests")
    prompt = _lengths(fields.get("prompt", "512"), "prompt", limits)
    output = _lengths(fields.get("output", "128"), "output", limits)
    rng = random.Random(seed)
    t, tokens, out = 0.0, 0, []
    for i in range(n):
        out.append(Request(i, t, prompt(rng), output(rng)))
        tokens += out[-1].prompt + out[-1].output
        limits.check("workload-tokens", tokens, f"workload {spec[:80]!r}: prompt plus output tokens")
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return out


def load_trace(path: Path, limits: Limits | None = None) -> list[Request]:
    """JSON lines of {"arrival": s, "prompt": tokens, "output": tokens} (arrival_time/prompt_tokens/output_tokens
    are read too), read a line at a time within `limits`."""
    limits = limits or Limits()
    out, tokens = [], 0
    for n, line in read_lines(path, "trace"):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}: line {n}")
        try:
            arrival = float(row.get("arrival", row.get("arrival_time")))
        except (TypeError, ValueError, OverflowError, AttributeError):
            raise DoolyError(f"{path}: line {n} is not a request (arrival, prompt, output)") from None
        where = f"{path}: line {n}"
        out.append(request(len(out), arrival, row.get("prompt", row.get("prompt_tokens")),
                           row.get("output", row.get("output_tokens")), limits, where))
        limits.check("requests", len(out), f"{path}: requests")
        tokens += out[-1].prompt + out[-1].output
        limits.check("workload-tokens", tokens, f"{path}: prompt plus output tokens up to line {n}")
    if not out:
        raise DoolyError(f"{path}: no requests")
    return sorted(out, key=lambda r: (r.arrival, r.id))
