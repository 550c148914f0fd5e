"""Runs a list of GPU jobs across several device calls, resuming where the last call stopped.

A lent machine keeps its files between calls while it stays warm, but one call may run 10 minutes at most: so the
jobs (calibrations, ground-truth recordings, profiling runs) are listed once, and each call runs the next ones that
fit before its deadline, each job's output kept under the state folder and everything packed into one archive
under $OUT after every job (a call cut off still brings back what finished):

    python3 tools/device_queue.py JOBS --state /tmp/queue --deadline-s 580 --out "$OUT"

JOBS holds one job a line, `name seconds [vllm]: command` (seconds: how long it is expected to take; a job is
started only while that much time is left; `vllm`: it needs vLLM, and waits for a call where vLLM imports, as the
first calls of a bring-up carry the pieces of vLLM while running the jobs that need none), `#` starting a comment.
Commands run in the repository root under bash, with $RES (the state folder's results) and $STORE (a copy of the
store given by --store, made once) set.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(path: Path) -> list[tuple[str, float, bool, str]]:
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, command = line.partition(":")
        words = head.split()
        if not sep or len(words) not in (2, 3) or not words[1].replace(".", "", 1).isdigit() \
                or words[2:] not in ([], ["vllm"]):
            fail(f"{path}:{number}: expected 'name seconds [vllm]: command'")
        jobs.append((words[0], float(words[1]), words[2:] == ["vllm"], command.strip()))
    names = [n for n, _, _, _ in jobs]
    if len(set(names)) != len(names):
        fail(f"{path}: job names repeat")
    return jobs


def pack(state: Path, out: Path) -> None:
    partial = out / "results.tgz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for name in ("res", "logs", "done"):
            if (state / name).exists():
                tar.add(state / name, arcname=name)
    partial.replace(out / "results.tgz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", type=Path)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, required=True, help="seconds this call may run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, help="copied to the state folder once, as $STORE")
    args = parser.parse_args()
    start = time.monotonic()
    jobs = parse(args.jobs)
    for name in ("res", "logs", "done"):
        (args.state / name).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RES": str(args.state / "res")}
    if args.store:
        store = args.state / "res" / args.store.name
        if not store.exists():
            shutil.copy(args.store, store)
        env["STORE"] = str(store)
    args.out.mkdir(parents=True, exist_ok=True)
    has_vllm = importlib.util.find_spec("vllm") is not None  # jobs inherit this process's PYTHONPATH
    for name, seconds, needs_vllm, command in jobs:
        if (args.state / "done" / name).exists():
            continue
        if needs_vllm and not has_vllm:
            print(f"[queue] {name} waits for vLLM (not importable in this call)", flush=True)
            continue
        left = args.deadline_s - (time.monotonic() - start)
        if seconds > left:
            print(f"[queue] {name} needs ~{seconds:.0f} s, {left:.0f} s left: stopping here", flush=True)
            break
        print(f"[queue] {name} starts at {time.monotonic() - start:.0f} s", flush=True)
        t = time.monotonic()
        with open(args.state / "logs" / f"{name}.log", "a") as log:
            log.write(f"== {command}\n")
            log.flush()
            proc = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, left - 5))
            except subprocess.TimeoutExpired:  # the whole group: an engine left running would hold the GPU
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        took = time.monotonic() - t
        print(f"[queue] {name}: rc {rc} in {took:.0f} s", flush=True)
        if rc != "timeout":  # a failed job is not retried (its log says why); one the deadline cut off is
            (args.state / "done" / name).write_text(f"rc {rc} in {took:.1f} s\n")
        if rc != 0:
            tail = (args.state / "logs" / f"{name}.log").read_text().splitlines()[-15:]
            print("\n".join("    " + line for line in tail), flush=True)
        pack(args.state, args.out)
    left = [n for n, _, _, _ in jobs if not (args.state / "done" / n).exists()]
    print(f"[queue] left: {' '.join(left) or 'none'}", flush=True)
    pack(args.state, args.out)


if __name__ == "__main__":
    main()
