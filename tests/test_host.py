"""The host-time fit (`dooly.predict.host`) on calibration rows made from known costs: it recovers them."""

import pytest
from test_store import env

from dooly.bench.host import LAYERS, SYNTHETIC, synthetic
from dooly.compile import cached_compile
from dooly.config import parse_config
from dooly.predict.host import KernelCount, fit
from dooly.store import Store

ENV = "h100/sdpa"
LAUNCH_BASE, PER_KERNEL, PLAN = 4000.0, 11.0, 3000.0
FIRST_CALLS = {(32, 64): [45000.0, 700000.0], (8, 256): [52000.0, 61000.0]}  # µs above the steady call


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """Launch = base + per kernel + a plan for each attention shape (the Gemma-2s have two), every other phase
    linear, at decode and prefill compositions, as `dooly.bench.host` records them."""
    store = Store(tmp_path_factory.mktemp("host") / "host.sqlite")
    store.add_environment(env())
    for name in SYNTHETIC:
        for layers in LAYERS[name]:
            count = KernelCount.of(cached_compile(parse_config(synthetic(name, layers), name, name)), "paged|sdpa")
            for R, T, K in ((1, 16, 16), (1, 1, 17), (8, 8, 4100), (32, 512, 512)):
                point = {"model": list(SYNTHETIC).index(name), "layers": layers, "R": R, "T": T, "K": K}
                launch = LAUNCH_BASE + PER_KERNEL * float(count(R, K > T)) + PLAN * count.types
                for phase, us in (("launch", launch), ("prepare", 700 + 30 * R), ("update", 130 + 2 * R),
                                  ("forward", launch), ("step", launch + 150)):
                    store.record_host(ENV, phase, point, us, us, 3)
    for (heads, dim), extras in FIRST_CALLS.items():
        for i, us in enumerate(extras):
            store.record_host(ENV, "attention_first_call", {"heads": heads, "head_dim": dim, "T": 1, "K": 100 + i},
                              us, us, 1)
    return fit(store, ENV)


def test_fit_recovers_each_phase(calibrated):
    assert calibrated.launch == pytest.approx([LAUNCH_BASE, PER_KERNEL], rel=1e-6)
    assert calibrated.plan_us == pytest.approx(PLAN, rel=1e-6)  # from the Gemma-2s' second attention shape
    assert calibrated.prepare[:2] == pytest.approx([700, 30], rel=1e-6)
    assert calibrated.update == pytest.approx([130, 2], rel=1e-6)
    assert calibrated.step_extra == pytest.approx(150)


def test_a_head_configuration_takes_its_cheapest_first_call_and_others_the_fitted_plan(calibrated):
    assert calibrated.plan_for(32, 64) == 45000.0  # the 0.7 s call also compiled a kernel: not a plan
    assert calibrated.plan_for(8, 256) == 52000.0
    assert calibrated.plan_for(40, 128) == pytest.approx(PLAN, rel=1e-6)
