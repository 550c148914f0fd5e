"""`dooly groundtruth`: what it records is what `dooly validate` reads, a rerun resumes, and bad input is one line.

The engine itself runs only on a GPU; here a fake engine serves each trace, so the command's bookkeeping (warm-up
runs discarded, files per backend, traces added to an earlier recording) is checked on the CPU.
"""

import dataclasses
import json

import pytest
from helpers import ROOT, dooly, gpu_available

from dooly.bench import cli, groundtruth
from dooly.bench.engine import MeasuredStep, Result
from dooly.limits import Limits
from dooly.validate import read_groundtruth

CONFIG = ROOT / "configs" / "llama-3.2-1b.json"


@dataclasses.dataclass
class FakeEnvironment:
    gpu: str = "fake GPU"


class FakeEngine:
    """Serves every request of a trace in one prefill step and one decode step."""

    served: list = []

    def __init__(self, config: dict, **options):
        self.options = options

    def run(self, requests):
        FakeEngine.served.append(requests)
        prompts = [p for _, p, _ in requests]
        prefill = MeasuredStep(prompts, prompts, None, 1e-3, 1e-3, 0.01, 0.02, 1e-3, 0.0)
        decode = MeasuredStep([1] * len(requests), [p + 1 for p in prompts], None, 1e-3, 1e-3, 0.005, 0.01, 1e-3, 0.02)
        results = [Result(f"r{i}", p, o, arrival, arrival + 0.02, [arrival + 0.02, arrival + 0.03])
                   for i, (arrival, p, o) in enumerate(requests)]
        return [prefill, decode], results

    def resolved_config(self) -> dict:
        return {"num_blocks": 64, "block_size": 256, "max_batch_tokens": 8192, "max_requests_per_batch": 64,
                "q_padding_interval_size": 64, "kv_padding_interval_size": 4096}

    def close(self) -> None:
        pass


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "detect", lambda backend: FakeEnvironment())
    monkeypatch.setattr(groundtruth, "Engine", FakeEngine)
    FakeEngine.served = []


def test_recorded_files_are_what_validate_reads_and_a_rerun_resumes(fake_gpu, tmp_path):
    assert cli.groundtruth_main([str(CONFIG), "--out", str(tmp_path), "--repeats", "2", "--traces", "chat"]) == 0
    path = tmp_path / "sdpa" / "llama-3.2-1b.json"
    truth = read_groundtruth(path, Limits(), {"llama-3.2-1b"})
    assert truth["model"] == "llama-3.2-1b" and truth["backend"] == "sdpa"
    assert truth["environment"] == {"gpu": "fake GPU"}
    assert sorted(truth["traces"]) == ["chat@32", "chat@8"]
    assert all(len(trace["runs"]) == 2 for trace in truth["traces"].values())  # the warm-up run is not kept
    served = len(FakeEngine.served)
    assert served == 1 + 2 * 3  # the process's warm-up, then each trace once to warm up and twice kept

    assert cli.groundtruth_main([str(CONFIG), "--out", str(tmp_path), "--traces", "chat"]) == 0
    assert len(FakeEngine.served) == served  # everything asked for is recorded: the engine is not started
    assert cli.groundtruth_main([str(CONFIG), "--out", str(tmp_path), "--repeats", "1", "--traces", "burst"]) == 0
    truth = read_groundtruth(path, Limits(), {"llama-3.2-1b"})
    assert sorted(truth["traces"]) == ["burst@inf", "chat@32", "chat@8"]


def test_backend_and_cuda_graphs_choose_the_folder(fake_gpu, tmp_path):
    args = [str(CONFIG), "--out", str(tmp_path), "--repeats", "1", "--traces", "longctx"]
    assert cli.groundtruth_main([*args, "--backend", "sdpa-efficient", "--graphs"]) == 0
    truth = json.loads((tmp_path / "sdpa-efficient-graphs" / "llama-3.2-1b.json").read_text())
    assert truth["backend"] == "sdpa-efficient" and truth["cuda_graphs"] is True


def test_a_file_that_is_not_ground_truth_is_refused_not_overwritten(fake_gpu, tmp_path, capsys):
    (tmp_path / "sdpa").mkdir()
    (tmp_path / "sdpa" / "llama-3.2-1b.json").write_text("[1, 2]")
    assert cli.groundtruth_main([str(CONFIG), "--out", str(tmp_path)]) == 2
    assert "not a ground-truth file" in capsys.readouterr().err
    assert (tmp_path / "sdpa" / "llama-3.2-1b.json").read_text() == "[1, 2]"


@pytest.mark.parametrize("args, message", [
    (["nope.json", "--out", "OUT"], "no such file"),
    ([str(CONFIG), "--out", "OUT", "--repeats", "0"], "--repeats must be at least 1"),
    pytest.param([str(CONFIG), "--out", "OUT"], "CUDA GPU",
                 marks=pytest.mark.skipif(gpu_available(), reason="this machine has a GPU to record on")),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    r = dooly("groundtruth", *[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_shipped_ground_truth_counts_as_recorded(fake_gpu, tmp_path):
    """data/groundtruth was recorded before the command existed: a rerun over it finds every trace there."""
    (tmp_path / "sdpa").mkdir()
    shipped = ROOT / "data" / "groundtruth" / "sdpa" / "llama-3.2-1b.json"
    (tmp_path / "sdpa" / shipped.name).write_bytes(shipped.read_bytes())
    assert cli.groundtruth_main([str(CONFIG), "--out", str(tmp_path)]) == 0
    assert FakeEngine.served == []
    assert (tmp_path / "sdpa" / shipped.name).read_bytes() == shipped.read_bytes()
