"""What Ray's worker processes run in tests/test_ray.py: a fake GPU (its environment and timer) installed at worker
start-up (`install`, Ray's `worker_process_setup_hook`), and a task that kills its own worker.

A worker dies on purpose only while an armed marker file exists in $DOOLY_TEST_MARKERS: the first worker to rename
it away exits, so exactly one task dies once, after `KILL_AFTER` measurements."""

import os
from pathlib import Path

KILL_AFTER = 3
ARMED, FIRED = "kill-armed", "kill-fired"
_measured = 0


def environment(backend, dtype: str = "bf16"):
    from dooly.store import Environment

    return Environment(name=f"fake-gpu/{backend.attention}", gpu="fake GPU", compute_capability="9.0",
                       driver="0", cuda="13.0", torch="2.13.0", triton="3.6.0", engine="transformers-cb",
                       engine_version="5.17.0", dtype=dtype, kv_cache_dtype=dtype, block_size=256,
                       attention_backend=backend.attention)


class Benchmark:
    """Stands for a generated microbenchmark: its inputs are the point itself, so no tensor is made."""

    def make_inputs(self, point, device):
        return (point,)

    def run(self, point):
        return point


def measure(make_inputs, run, device):
    """A latency flat up to 512, then linear in the point's largest size."""
    global _measured
    from dooly.bench.timer import Timing

    _measured += 1
    markers = Path(os.environ["DOOLY_TEST_MARKERS"])
    if _measured > KILL_AFTER:
        try:
            (markers / ARMED).rename(markers / FIRED)
        except FileNotFoundError:
            pass
        else:
            os._exit(1)
    (point,) = make_inputs()
    size = max([v for v in point.values() if isinstance(v, int)] or [1])
    return Timing([5.0 + 0.01 * max(0, size - 512)] * 15, 1, 1, True, 0.001)


def install():
    import dooly.bench.timer
    import dooly.profile

    dooly.bench.timer.measure = measure
    dooly.profile.detect = environment
    dooly.profile.load = lambda path: Benchmark()


def die_once(marker: str, value: int) -> int:
    """Doubles `value`; the first time for this marker, kills its own worker instead."""
    path = Path(marker)
    if not path.exists():
        path.touch()
        os._exit(1)
    return 2 * value


def die() -> None:
    os._exit(1)
