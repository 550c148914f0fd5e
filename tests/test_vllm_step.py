"""vLLM's step from the H200 store: padding to captured sizes, attention over a batch, the engine's floor, and
`dooly validate` on vLLM's ground truth."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dooly.compile import load_model
from dooly.predict.vllm_step import CAPTURE_SIZES, AttentionCurve, Curve, padded, step_model
from dooly.store import Store

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "data" / "h200.sqlite"
IR = ROOT / "data" / "vllm-ir"
TRUTH = ROOT / "data" / "groundtruth" / "vllm" / "flash_attn" / "llama-3.1-8b.json"


def test_padding_follows_the_captured_sizes():
    assert [padded(t) for t in (1, 3, 8, 9, 255, 256)] == [1, 4, 8, 16, 256, 256]
    assert padded(257) == 257 and padded(2048) == 2048
    assert all(padded(s) == s for s in CAPTURE_SIZES)


def test_curve_is_flat_below_linear_inside_and_extends_the_last_slope():
    c = Curve([4, 1, 2], [30.0, 10.0, 20.0])
    assert c(0.5) == 10.0 and c(3) == 25.0 and c(6) == 40.0


def test_attention_of_a_mixed_batch_is_its_parts_with_one_launch_floor():
    rows = {(r, 1, c): 5.0 + r * c / 1000 for r in (1, 2, 4) for c in (16, 1024, 4096)}
    rows |= {(1, q, c): 8.0 + q * (c + q) / 1000 for q in (16, 256) for c in (0, 2048)}
    a = AttentionCurve(rows)
    decode = a([(1, 1025), (1, 1025)])
    prefill = a([(256, 256)])
    assert a([(1, 1025), (1, 1025), (256, 256)]) == pytest.approx(decode + prefill - a.floor)
    assert a([(1, 4097)] * 4) > a([(1, 1025)] * 4) > a([(1, 17)] * 4)


@pytest.fixture(scope="module")
def store():
    return Store(STORE, readonly=True)


def test_a_step_pads_its_pieces_and_its_span_follows_the_hosts_lead_over_the_gpu(store):
    big = step_model(load_model(IR / "llama-3.1-8b.ir"), store, "FLASH_ATTN")
    small = step_model(load_model(IR / "llama-3.2-1b.ir"), store, "FLASH_ATTN")
    decode = [(1, 1000)] * 8
    launch, lead = small.launch_us(8, 8), small.lead_us(8, 8)
    assert launch > lead > 0
    # entered long before the GPU is free, the host's work is hidden: the step is its GPU work
    assert big.span_us(decode, 10_000) == pytest.approx(big.gpu_us(decode))
    assert small.span_us(decode, 10_000) == pytest.approx(small.gpu_us(decode))
    # entered on an idle GPU: the first kernel waits for the inputs, the span ends no sooner than the last launch
    idle = small.span_us(decode, -1.0)
    assert idle == pytest.approx(max(lead + small.gpu_us(decode), launch)) and idle > small.gpu_us(decode)
    assert small.span_us(decode, -1.0) == small.span_us(decode, -1e6)  # however long the GPU idled
    assert small.gpu_us(decode) < small.span_us(decode, 500) < idle  # partly ahead: partly hidden
    # 9 and 16 requests replay the same padded graphs: only attention and the sampled rows differ
    nine, sixteen = big.gpu_us([(1, 1000)] * 9), big.gpu_us([(1, 1000)] * 16)
    pieces = lambda m, b: sum(c * f(16) for kind, c, f, _ in m.terms if kind == "padded")  # noqa: E731
    assert pieces(big, None) < nine < sixteen < nine + 0.2 * pieces(big, None)
    assert big.gpu_us([(2048, 2048)]) > 5 * big.gpu_us([(256, 256)])  # above the captured sizes: unpadded


def test_every_signature_of_the_measured_models_is_in_the_store(store):
    measured = {"FLASH_ATTN": ("llama-3.1-8b", "qwen3-8b", "mistral-7b-v0.3", "qwen2.5-7b", "llama-2-7b",
                               "phi-3-mini", "gemma-2-9b", "llama-3.2-1b", "qwen3-1.7b"),
                "TRITON_ATTN": ("llama-3.1-8b", "qwen3-8b", "llama-3.2-1b", "qwen3-1.7b")}
    for backend, names in measured.items():
        for name in names:
            step_model(load_model(IR / f"{name}.ir"), store, backend)  # raises on a signature without points


def _validate(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dooly.cli", "validate", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_validate_reports_vllm_rows(tmp_path):
    (tmp_path / "gt" / "flash_attn").mkdir(parents=True)
    shutil.copy(TRUTH, tmp_path / "gt" / "flash_attn")
    out = _validate(["--groundtruth", str(tmp_path / "gt"), "--store", str(STORE), "--models", str(IR), "--json",
                     "--plots", str(tmp_path / "plots")])
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)["rows"]
    assert row["backend"] == "vllm FLASH_ATTN+graphs" and row["n_steps"] > 100 and row["n_requests"] > 100
    assert 0 <= row["step_mape"] < 1 and 0 <= row["ttft_mape"] < 1 and 0 <= row["tpot_mape"] < 1


def test_validate_refuses_vllm_ground_truth_without_its_ir_or_with_a_broken_step(tmp_path):
    folder = tmp_path / "gt" / "flash_attn"
    folder.mkdir(parents=True)
    truth = json.loads(TRUTH.read_text())
    (folder / "llama-3.1-8b.json").write_text(json.dumps(truth))
    others = tmp_path / "irs"
    others.mkdir()
    shutil.copy(IR / "qwen3-8b.ir", others)
    out = _validate(["--groundtruth", str(tmp_path / "gt"), "--store", str(STORE), "--models", str(others)])
    assert out.returncode == 2 and out.stderr.startswith("error:") and "--models" in out.stderr
    truth["traces"]["chat@8"]["runs"][0]["steps"][0]["computed"].append(5)
    (folder / "llama-3.1-8b.json").write_text(json.dumps(truth))
    out = _validate(["--groundtruth", str(tmp_path / "gt"), "--store", str(STORE), "--models", str(IR)])
    assert out.returncode == 2 and out.stderr.startswith("error:") and "computed" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_hosts_costs_follow_the_models_depth():
    from dooly.predict.vllm_step import HostCost, StepModel

    floor = lambda us: HostCost(Curve([1, 64], [us, us + 100]), Curve([16, 2048], [2 * us, 3 * us]), None)  # noqa: E731
    model = lambda layers: StepModel([], layers, launch={2: floor(1000.0), 16: floor(2400.0)})  # noqa: E731
    assert model(2).launch_us(1, 1) == 1000 and model(16).launch_us(1, 1) == 2400
    assert model(9).launch_us(1, 1) == pytest.approx(1700) and model(30).launch_us(1, 1) == pytest.approx(3800)
    assert model(9).launch_us(2048, 1) == pytest.approx(3 * 1700)  # a lone prefill reads the prefill curve
    assert StepModel([], 32, launch={2: floor(1000.0)}).launch_us(1, 1) == 1000  # one depth stands for all


def test_a_step_from_an_idle_gpu_waits_for_the_hosts_input_preparation():
    from dooly.predict.vllm_step import HostCost, StepModel

    flat = lambda us: HostCost(Curve([1, 64], [us, us]), Curve([16, 2048], [us, us]), None)  # noqa: E731
    gpu = Curve([1, 4096], [5000.0, 5000.0])
    model = StepModel([("padded", 1, gpu, {"M": "T"})], 16, launch={16: flat(3000.0)}, lead={16: flat(1500.0)})
    assert model.span_us([(2048, 2048)], 2000) == 5000  # entered while the last step runs: GPU-bound
    assert model.span_us([(2048, 2048)], -1.0) == 6500
    assert model.span_us([(2048, 2048)], 1000) == 5500  # the GPU was free 1 ms before the inputs were
    slow_host = StepModel(model.terms, 16, launch={16: flat(7000.0)}, lead={16: flat(1500.0)})
    assert slow_host.span_us([(2048, 2048)], -1.0) == 7000  # the host's launches already span its lead
    assert slow_host.span_us([(2048, 2048)], 4000) == 5000  # ... and are hidden by the GPU's earlier work
    assert StepModel(model.terms, 16).span_us([(2048, 2048)], -1.0) == 5000  # none measured


def test_the_hosts_rest_of_a_cycle_is_its_decode_cycle_less_its_launches(store):
    """After launching a step the host reads the step before's output, processes it and schedules the next."""
    env = next(e.name for e in store.environments() if e.engine == "vllm" and e.attention_backend == "FLASH_ATTN")
    rows = {(r["phase"], r["point"]["T"], r["point"]["R"]): r["median_us"] for r in store.host(env)
            if r["point"].get("layers") == 16 and "runner" not in r["point"]}
    model = step_model(load_model(IR / "llama-3.2-1b.ir"), store, "FLASH_ATTN")  # 16 layers: no interpolation
    assert rows["vllm-cycle", 8, 8] > rows["vllm-launch", 8, 8]
    assert model.rest_us(8) == pytest.approx(rows["vllm-cycle", 8, 8] - rows["vllm-launch", 8, 8])
    assert model.launch_us(256, 1) == pytest.approx(rows["vllm-launch", 256, 1])


def test_host_costs_are_taken_from_the_model_runner_vllm_serves_the_architecture_on(tmp_path):
    from dooly.environment import vllm_model_runner

    path = tmp_path / "s.sqlite"
    shutil.copy(STORE, path)
    s = Store(path)
    env = next(e.name for e in s.environments() if e.engine == "vllm" and e.attention_backend == "FLASH_ATTN")
    phases = sorted({row["phase"] for row in s.host(env)})
    for layers in {row["point"]["layers"] for row in s.host(env) if "runner" in row["point"]}:
        s.forget_host(env, phases, {"layers": layers, "runner": 1})  # the store's own V1 calibration
    v2 = step_model(load_model(IR / "phi-3-mini.ir"), s, "FLASH_ATTN")
    for row in s.host(env):  # a V1-runner calibration, twice the V2 one
        s.record_host(env, row["phase"], {**row["point"], "runner": 1}, 2 * row["median_us"], 2 * row["p90_us"],
                      row["repetitions"])
    phi = step_model(load_model(IR / "phi-3-mini.ir"), s, "FLASH_ATTN")
    llama = step_model(load_model(IR / "llama-2-7b.ir"), s, "FLASH_ATTN")
    s.close()
    assert vllm_model_runner("Phi3ForCausalLM") == "v1" and vllm_model_runner("LlamaForCausalLM") == "v2"
    assert v2.host_runner == "v2" and phi.host_runner == "v1" and llama.host_runner == "v2"
    assert phi.rest_us(8) == pytest.approx(2 * v2.rest_us(8))
    assert phi.launch_us(200, 1) == pytest.approx(2 * v2.launch_us(200, 1))
    assert phi.admit_us(8) == pytest.approx(2 * v2.admit_us(8))


def test_how_far_ahead_of_the_gpu_the_host_entered_each_step():
    from dooly.vllm_validate import host_ahead

    steps = [{"start": 0.0, "forward_s": 0.010},  # the first step
             {"start": 0.004, "forward_s": 0.010},  # entered while the first runs: its span starts at 0.010
             {"start": 0.019, "forward_s": 0.002},  # before the second's end (0.020)
             {"start": 0.030, "forward_s": 0.002}]  # after the third's (0.022)
    ahead = host_ahead(steps)
    assert ahead[0] == -math.inf and ahead[1:] == pytest.approx([0.006, 0.001, -0.008])


def test_host_costs_jump_where_steps_stop_replaying_graphs():
    """Up to the largest captured size a step replays graphs; above it every kernel is launched from Python."""
    from dooly.predict.vllm_step import ByMode

    launch = ByMode([(16, 8000.0), (256, 9000.0), (512, 24000.0), (2048, 25000.0)])
    assert launch(136) == pytest.approx(8500.0) and launch(256) == 9000.0
    assert launch(257) == 24000.0 and launch(1280) == pytest.approx(24500.0)  # the eager side's own points
    assert ByMode([(16, 8000.0), (256, 9000.0)])(300) == pytest.approx(9000.0 + 44 * 1000 / 240)  # none above: one line


def test_a_finished_piece_sweep_missing_points_of_todays_grid_is_profiled_again_for_those(tmp_path):
    """The store's pieces were timed before steps above the captured sizes were timed eagerly, as vLLM runs them."""
    import sqlite3

    from dooly.bench.compiled import PIECE_POINTS, points_left
    from dooly.passes.pieces import piece_uses
    from dooly.predict.vllm_step import vllm_environment
    from dooly.store import Stats

    path = tmp_path / "s.sqlite"
    shutil.copy(STORE, path)
    piece = next(u.signature for u in piece_uses(load_model(IR / "llama-3.1-8b.ir"), "FLASH_ATTN")
                 if u.signature.family == "piece")
    other = next(u.signature for u in piece_uses(load_model(IR / "llama-3.1-8b.ir"), "FLASH_ATTN")
                 if u.signature.family != "piece")
    with sqlite3.connect(path) as db:  # the store as it was before eager points were timed
        db.execute("DELETE FROM measurements WHERE signature = ? AND point LIKE ?", (piece.hash, '%"graph":0%'))
    s = Store(path)
    env = vllm_environment(s, "FLASH_ATTN")
    assert piece.hash in s.finished_sweeps(env) and points_left(s, env, piece)
    assert not points_left(s, env, other)  # only pieces have a fixed grid
    for point in PIECE_POINTS:
        s.record(piece.hash, env, point, Stats(1.0, 1.0, 1.0, 0.0, 10))
    assert not points_left(s, env, piece)
    s.close()


def test_plan_counts_a_piece_lacking_points_of_todays_grid_as_left_to_profile(tmp_path):
    import contextlib
    import io

    from dooly.bench.compiled import PIECE_POINTS
    from dooly.passes.pieces import piece_uses
    from dooly.plan import main as plan
    from dooly.predict.vllm_step import vllm_environment
    from dooly.store import Stats

    path = tmp_path / "s.sqlite"
    shutil.copy(STORE, path)
    s = Store(path)
    env = vllm_environment(s, "FLASH_ATTN")
    pieces = [u.signature for u in piece_uses(load_model(IR / "llama-3.1-8b.ir"), "FLASH_ATTN")
              if u.signature.family == "piece"]
    for sig in pieces[1:]:  # every point of today's grid for all pieces but the first
        for point in PIECE_POINTS:
            s.record(sig.hash, env, point, Stats(1.0, 1.0, 1.0, 0.0, 10))
    s.close()
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db, db:  # the first piece as the store had it before: replays
        db.execute("DELETE FROM measurements WHERE signature = ? AND point LIKE '%graph%'", (pieces[0].hash,))

    def row():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert plan([str(IR / "llama-3.1-8b.ir"), "--store", str(path), "--env", env, "--json"]) == 0
        return json.loads(out.getvalue())["models"][0]

    from dooly.plan import estimate_s

    left = row()
    eager = [p for p in PIECE_POINTS if "graph" in p]
    assert left["new"] == 1 and left["in_store"] == left["unique"] - 1
    # costed for the points it lacks only
    assert left["est_gpu_s"] == pytest.approx(estimate_s(pieces[0], {}, eager), abs=1e-3)
    assert left["est_gpu_s"] < estimate_s(pieces[0], {}) / 2
