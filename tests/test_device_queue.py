"""tools/device_queue.py: GPU jobs across device calls, a job that needs vLLM held until a call where it imports."""

import subprocess
import sys

from helpers import ROOT

QUEUE = ROOT / "tools" / "device_queue.py"


def run_queue(jobs, tmp_path, *extra):
    (tmp_path / "jobs.txt").write_text(jobs)
    return subprocess.run([sys.executable, str(QUEUE), str(tmp_path / "jobs.txt"), "--state", str(tmp_path / "q"),
                           "--deadline-s", "60", "--out", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, cwd=ROOT)


def test_a_job_that_needs_vllm_waits_while_vllm_does_not_import_and_the_rest_run(tmp_path):
    jobs = ("needs 1 vllm: echo ran > $RES/needs.txt\n"
            "plain 1: echo ran > $RES/plain.txt\n")
    r = run_queue(jobs, tmp_path)  # the core venv has no vLLM
    assert r.returncode == 0, r.stderr
    assert "needs waits for vLLM" in r.stdout and "[queue] left: needs" in r.stdout
    assert (tmp_path / "q" / "res" / "plain.txt").exists() and not (tmp_path / "q" / "res" / "needs.txt").exists()
    assert not (tmp_path / "q" / "done" / "needs").exists() and (tmp_path / "out" / "results.tgz").exists()
    fake = tmp_path / "site" / "vllm"  # a later call, with vLLM on the path: the held job runs, the done one not again
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (tmp_path / "q" / "res" / "plain.txt").unlink()
    r = subprocess.run([sys.executable, str(QUEUE), str(tmp_path / "jobs.txt"), "--state", str(tmp_path / "q"),
                        "--deadline-s", "60", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "res" / "needs.txt").exists() and not (tmp_path / "q" / "res" / "plain.txt").exists()
    assert "[queue] left: none" in r.stdout


def test_a_malformed_job_line_is_one_error_line(tmp_path):
    r = run_queue("a 1 gpu: true\n", tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'jobs.txt'}:1: expected 'name seconds [vllm]: command'"]
