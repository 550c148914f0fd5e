"""The host-time fit (`dooly.predict.host`) on calibration rows made from known costs: it recovers them."""

import pytest
from test_store import env

from dooly.bench.host import LAYERS, SYNTHETIC, count_kernels, main, synthetic_graph
from dooly.bench.kernels import KernelCount
from dooly.predict.host import fit
from dooly.store import Store

ENV = "h100/sdpa"
LAUNCH_BASE, PER_KERNEL, PLAN = 4000.0, 11.0, 3000.0
FIRST_CALLS = {(32, 64): [45000.0, 700000.0], (8, 256): [52000.0, 61000.0]}  # µs above the steady call


def calibration(folder, first_calls: dict, kernels: bool = True) -> Store:
    """Launch = base + per kernel + a plan for each attention shape (the Gemma-2s have two), every other phase
    linear, at decode and prefill compositions, as `dooly.bench.host` records them."""
    store = Store(folder / "host.sqlite")
    store.add_environment(env())
    if kernels:
        count_kernels(store, ENV, "paged|sdpa", [(name, layers) for name in SYNTHETIC for layers in LAYERS[name]])
    for name in SYNTHETIC:
        for layers in LAYERS[name]:
            count = KernelCount.of(synthetic_graph(name, layers), "paged|sdpa")
            for R, T, K in ((1, 16, 16), (1, 1, 17), (8, 8, 4100), (32, 512, 512)):
                point = {"model": list(SYNTHETIC).index(name), "layers": layers, "R": R, "T": T, "K": K}
                launch = LAUNCH_BASE + PER_KERNEL * float(count(R, K > T)) + PLAN * count.types
                for phase, us in (("launch", launch), ("prepare", 700 + 30 * R), ("update", 130 + 2 * R),
                                  ("forward", launch), ("step", launch + 150)):
                    store.record_host(ENV, phase, point, us, us, 3)
    for (heads, dim), extras in first_calls.items():
        for i, us in enumerate(extras):
            store.record_host(ENV, "attention_first_call", {"heads": heads, "head_dim": dim, "T": 1, "K": 100 + i},
                              us, us, 1)
    return store


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return fit(calibration(tmp_path_factory.mktemp("host"), FIRST_CALLS), ENV)


def test_fit_recovers_each_phase(calibrated):
    assert calibrated.launch == pytest.approx([LAUNCH_BASE, PER_KERNEL], rel=1e-6)
    assert calibrated.prepare[:2] == pytest.approx([700, 30], rel=1e-6)
    assert calibrated.update == pytest.approx([130, 2], rel=1e-6)
    assert calibrated.step_extra == pytest.approx(150)


def test_the_plan_is_the_median_first_call_of_all_heads_without_the_one_that_compiled_a_kernel(calibrated):
    assert calibrated.plan_us == 52000.0  # of 45, 52 and 61 ms: the 0.7 s call also compiled a kernel


def test_without_first_calls_the_plan_comes_from_the_launch_fit(tmp_path):
    assert fit(calibration(tmp_path, {}), ENV).plan_us == pytest.approx(PLAN, rel=1e-6)  # the Gemma-2s' second shape


def test_attention_that_builds_no_plans_costs_none(tmp_path):
    assert fit(calibration(tmp_path, {(32, 64): [-40.0, 30.0, -10.0, 72000.0]}), ENV).plan_us == 0.0


def test_a_calibration_without_kernel_counts_asks_for_them_then_fits_once_they_are_counted(tmp_path):
    store = calibration(tmp_path, FIRST_CALLS, kernels=False)
    with pytest.raises(ValueError, match="--kernels-only"):
        fit(store, ENV)
    assert main(["--store", str(store.path), "--kernels-only"]) == 0
    assert fit(store, ENV).launch == pytest.approx([LAUNCH_BASE, PER_KERNEL], rel=1e-6)
