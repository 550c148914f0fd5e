"""The Ray backend on a local Ray instance (CPU workers, two declared GPUs with a fake timer): exploration for
real, profiling through the one writer, a worker killed mid-task and its task retried, resume from the store, and
an unreachable cluster refused."""

import functools
import os
from pathlib import Path

import pytest
from helpers import ROOT, compile_dict, dooly, tiny_llama

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

from dooly import ray_backend  # noqa: E402
from dooly.environment import backend  # noqa: E402
from dooly.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    """A local Ray instance whose workers have the fake GPU of tests/ray_fakes.py; yields its marker folder."""
    folder = tmp_path_factory.mktemp("markers")
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "DOOLY_TEST_MARKERS": str(folder)},
                          "worker_process_setup_hook": "ray_fakes.install"})
    yield folder
    ray.shutdown()


def test_a_task_whose_worker_dies_is_retried_and_counted(markers, tmp_path):
    import ray_fakes

    remote = ray.remote(max_retries=0)(ray_fakes.die_once)
    (tmp_path / "b").touch()  # this one has died already: it runs at once
    calls = [(str(tmp_path / name), value) for name, value in (("a", 1), ("b", 2), ("c", 3))]
    fan = ray_backend.FanOut(remote, calls)
    assert sorted(fan) == [2, 4, 6]
    assert fan.retried == 2


def test_a_task_that_keeps_dying_is_an_error(markers, tmp_path):
    import ray_fakes

    from dooly.errors import DoolyError

    remote = ray.remote(max_retries=0)(ray_fakes.die)
    with pytest.raises(DoolyError, match="failed 2 times"):
        list(ray_backend.FanOut(remote, [()], max_retries=1))


def test_exploration_through_ray_gives_the_local_rows(markers, shipped):
    from test_explore import setting_for

    from dooly.sim import explore

    setting, configs = setting_for(shipped, "max_seqs=8,64;cuda_graphs=off,on;scheduler=cb,vllm")
    tasks = explore.chunks(configs, 2)
    fan = ray_backend.explore_map(setting, tasks)
    through_ray = sorted((r for batch in fan for r in batch), key=lambda r: str(sorted(r.items())))
    local = sorted(explore.evaluate_all(setting, configs), key=lambda r: str(sorted(r.items())))
    assert through_ray == local and len(local) == len(configs) == 8
    assert fan.retried == 0 and len(tasks) > 1


@functools.lru_cache(maxsize=None)
def _graph():
    return compile_dict(tiny_llama(), "tiny-llama")


def _rows(path: Path) -> set[tuple]:
    store = Store(path, create=False)
    return {(r["signature"], r["point"]) for r in store.db.execute("SELECT signature, point FROM measurements")}


@pytest.fixture(scope="module")
def profiled(markers, tmp_path_factory):
    """A store profiled through Ray without incident, and its report."""
    path = tmp_path_factory.mktemp("clean") / "s.sqlite"
    return path, ray_backend.profile(path, [_graph()], backend("sdpa"), device="cpu")


def test_profiling_through_ray_measures_every_signature_once(profiled):
    path, report = profiled
    env = report["environment"]
    assert env == "fake-gpu/paged|sdpa" and report["gpus"] == 2 and report["tasks"] > 2
    assert report["left"] == 0 and report["retried_tasks"] == 0 and report["points_refused"] == 0
    measured = Store(path, create=False).finished_sweeps(env)
    assert len(measured) == report["profiled"] == report["signatures"] - report["in_store"] > 10
    assert report["points_written"] == len(_rows(path))
    again = ray_backend.profile(path, [_graph()], backend("sdpa"), device="cpu")
    assert again["profiled"] == 0 and again["in_store"] == report["signatures"] and again["points_written"] == 0


def test_a_worker_killed_mid_profile_is_retried_and_resumes_from_the_store(markers, profiled, tmp_path):
    import ray_fakes

    (markers / ray_fakes.ARMED).touch()
    killed = tmp_path / "killed.sqlite"
    report = ray_backend.profile(killed, [_graph()], backend("sdpa"), device="cpu")
    assert (markers / ray_fakes.FIRED).exists() and not (markers / ray_fakes.ARMED).exists()
    assert report["retried_tasks"] == 1 and report["left"] == 0
    # the points the killed task had sent were kept, and its retry measured only the rest: nothing twice
    assert report["points_refused"] == 0 and report["points_written"] == len(_rows(killed))
    assert _rows(killed) == _rows(profiled[0])


def test_an_unreachable_cluster_is_one_error_line():
    for command in (["explore", ROOT / "configs" / "llama-3.2-1b.json", "--store", ROOT / "data" / "h100.sqlite",
                     "--synthetic", "poisson:n=10", "--slo", "ttft_p90=1s"],
                    ["profile", ROOT / "configs" / "llama-3.2-1b.json", "--store", ROOT / "data" / "h100.sqlite"]):
        out = dooly(*command, "--ray", "127.0.0.1:1", timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines() == ["error: cannot reach the Ray cluster at 127.0.0.1:1: "
                                                   "Connection refused"]
