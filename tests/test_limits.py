"""Bounded work and clean errors for request inputs: every limit is checked before any work starts and named in
its one error line with the flag that raises it; bad numbers, files and output paths are one error line too."""

import json
import math
import random

import pytest
from helpers import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from dooly.cli import main
from dooly.config import load_config
from dooly.errors import DoolyError
from dooly.limits import LIMITS, Limits, output_file, output_folder, parse_limits
from dooly.predict.cli import parse_batch, read_batches
from dooly.sim import ContinuousBatching, Request, load_trace, simulate, synthetic
from dooly.sim.cli import warn_beyond_context
from dooly.validate import read_groundtruth

MODELS = {"llama-3.2-1b"}  # the models whose IRs dooly validate was given

IR = ROOT / "golden" / "llama-3.2-1b.ir"
CONFIG = ROOT / "configs" / "llama-3.2-1b.json"
TRUTH = ROOT / "data" / "groundtruth" / "sdpa" / "llama-3.2-1b.json"
BIG = 2**63


def run(capsys, *argv) -> tuple[int, str]:
    """A command run in this process, as `dooly` runs it: its exit code and what it wrote to stderr."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


# --- limits on one step: batch specs and batch files --------------------------------------------------------------

@pytest.mark.parametrize("spec, limit", [
    ("decode:99999999@1", "requests-per-step"),
    ("prefill:1x99999999", "requests-per-step"),
    (f"decode:{BIG}@1", "requests-per-step"),
    ("prefill:99999999x1", "tokens-per-step"),
    ("prefill:1024x1024,prefill:1x1", "tokens-per-step"),
    (f"decode:1@{BIG}", "context-tokens"),
    (f"prefill:1x1+{BIG}", "context-tokens"),
    (f"prefill:{BIG}x1", "tokens-per-step"),
])
def test_a_batch_spec_beyond_a_limit_is_refused_before_it_is_expanded(spec, limit):
    with pytest.raises(DoolyError, match=f"over the {limit} limit .* --limit {limit}=N"):
        parse_batch(spec)


def test_a_raised_limit_lets_the_batch_through():
    limits = parse_limits(["requests-per-step=70000"], ["requests-per-step"])
    assert parse_batch("decode:70000@1", limits) == [(1, 1)] * 70000
    with pytest.raises(DoolyError, match="over the requests-per-step limit of 100 "):
        parse_batch("decode:101@1", parse_limits(["requests-per-step=100"], ["requests-per-step"]))


BATCH_GROUP = st.one_of(
    st.builds(lambda q, n: f"prefill:{q}x{n}", st.integers(0, 2**70), st.integers(0, 2**70)),
    st.builds(lambda q, n, p: f"prefill:{q}x{n}+{p}", st.integers(0, 5000), st.integers(0, 50), st.integers(0, 2**70)),
    st.builds(lambda n, c: f"decode:{n}@{c}", st.integers(0, 2**70), st.integers(0, 2**70)),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(BATCH_GROUP, min_size=1, max_size=4).map(",".join)))
def test_any_batch_spec_parses_or_is_one_clear_error(spec):
    try:
        batch = parse_batch(spec)
    except DoolyError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= len(batch) <= LIMITS["requests-per-step"].default
    assert sum(q for q, _ in batch) <= LIMITS["tokens-per-step"].default


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe[[1, 2]]\n", ["not UTF-8"]),
    (f"[[1, {BIG}]]\n".encode(), ["context-tokens limit"]),
    (f"[[{BIG}, {BIG}]]\n".encode(), ["context-tokens limit"]),
    (b"[[1, 2]\n", ["line 1 is not JSON"]),
    (b"[" * 100_000 + b"\n", ["not JSON"]),
    (b"[[1, " + b"9" * 5000 + b"]]\n", ["not JSON"]),
    (b"[[1, 2.5]]\n", ["integers"]),
    (b"[[1, 2], [1, 2, 3]]\n", ["integers"]),
    (b"{}\n", ["a list of [query_tokens, kv_tokens] pairs"]),
    (b"\n\n", ["no batches"]),
    (b"[]\n", ["no requests"]),
    (b"[[2, 1]]\n", ["need 1 <= query_tokens <= kv_tokens"]),
    (json.dumps([[1, 1]] * 70_000).encode(), ["requests-per-step limit"]),
    (json.dumps([[600_000, 600_000]] * 2).encode(), ["tokens-per-step limit"]),
])
def test_a_bad_batch_file_is_one_error_line(capsys, tmp_path, content, words):
    path = tmp_path / "steps.jsonl"
    path.write_bytes(content)
    code, err = run(capsys, "predict", IR, "--store", tmp_path / "none.sqlite", "--batch-file", path)
    one_error_line(code, err, *words)


def test_a_batch_file_is_read_no_further_than_its_requests_limit(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text("[[1, 1], [1, 2]]\n" * 3 + "not JSON\n")
    with pytest.raises(DoolyError, match="requests up to line 3: 6, over the requests limit of 5 "):
        read_batches(path, Limits({"requests": 5}))
    with pytest.raises(DoolyError, match="line 4 is not JSON"):
        read_batches(path, Limits({"requests": 6}))


@pytest.mark.parametrize("argv, words", [
    (["--batch", ""], ["bad batch group ''"]),
    (["--batch", "decode:99999999@1"], ["requests-per-step limit", "--limit requests-per-step=N"]),
    (["--batch", "decode:1@1", "--limit", "requests-per-step=0"], ["--limit requests-per-step=0"]),
    (["--batch", "decode:1@1", "--limit", "steps=5"], ["unknown limit 'steps'"]),
    (["--batch", "decode:1@1", "--limit", f"context-tokens={BIG}"], ["an integer from 1 to"]),
    (["--batch", "decode:1@1", "--top", "-1"], ["--top"]),
])
def test_predict_options_are_checked_before_any_work(capsys, tmp_path, argv, words):
    code, err = run(capsys, "predict", IR, "--store", tmp_path / "none.sqlite", *argv)
    one_error_line(code, err, *words)


@pytest.mark.parametrize("given", [["x=1"], ["requests"], ["requests=-1"], ["requests=1.5"], ["requests=٣"],
                                   [f"requests={2**31 + 1}"], ["requests=" + "9" * 5000]])
def test_limit_values_are_positive_integers_of_known_limits(given):
    with pytest.raises(DoolyError, match="--limit"):
        parse_limits(given, ["requests"])


# --- limits on a workload: synthetic specs and traces --------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("poisson:rate=1,n=99999999999999999999999", "over the requests limit"),
    ("poisson:rate=nan,n=3", "rate must be a positive number"),
    ("poisson:rate=-inf,n=3", "rate must be a positive number"),
    ("poisson:rate=1,n=0", "n must be a positive number"),
    ("poisson:n=3,prompt=lognormal:inf:1", "MEDIAN must be a positive number"),
    ("poisson:n=3,prompt=lognormal:nan:1", "MEDIAN must be a positive number"),
    ("poisson:n=3,prompt=lognormal:512:nan", "SIGMA a non-negative"),
    ("poisson:n=3,prompt=lognormal:512:-1", "SIGMA a non-negative"),
    ("poisson:n=3,output=lognormal:512:1e308", "a drawn length: beyond any number, over the output-tokens limit"),
    ("poisson:n=3,prompt=lognormal:1e300:1", "over the prompt-tokens limit"),
    ("poisson:n=3,prompt=1000000000", "over the prompt-tokens limit"),
    (f"poisson:n=3,output={BIG}", "over the output-tokens limit"),
    ("poisson:n=1000,prompt=1000000,output=1", "over the workload-tokens limit"),
    ("poisson:n=3,prompt=lognormal:1:2:3", "expected lognormal:MEDIAN:SIGMA"),
])
def test_a_synthetic_workload_beyond_a_limit_or_malformed_is_refused(spec, words):
    with pytest.raises(DoolyError, match=words):
        synthetic(spec)


def test_synthetic_lengths_are_drawn_as_before():
    """The checks draw nothing of their own: the same seed gives the lognormal lengths it always gave."""
    rng = random.Random(7)
    expected = []
    for _ in range(50):
        expected.append((max(1, int(round(300 * math.exp(rng.gauss(0, 0.7))))),
                         max(1, int(round(40 * math.exp(rng.gauss(0, 0.3)))))))
        rng.expovariate(4.0)
    got = synthetic("poisson:rate=4,n=50,prompt=lognormal:300:0.7,output=lognormal:40:0.3", seed=7)
    assert [(r.prompt, r.output) for r in got] == expected


@pytest.mark.parametrize("lines, words", [
    (['{"arrival": 0, "prompt": 5, "output": 1000000000}'], "over the output-tokens limit"),
    ([f'{{"arrival": 0, "prompt": {BIG}, "output": 1}}'], "over the prompt-tokens limit"),
    (['{"arrival": 1e999, "prompt": 5, "output": 1}'], "arrival must be a non-negative number"),
    (['{"arrival": NaN, "prompt": 5, "output": 1}'], "arrival must be a non-negative number"),
    (['{"arrival": 1' + "0" * 400 + ', "prompt": 5, "output": 1}'], "is not a request"),
    (['{"arrival": 0, "prompt": 5.0, "output": 1}'], "prompt must be a positive integer"),
    (['[0, 5, 1]'], "is not a request"),
    (['{"arrival": 0, "prompt": 5, "output": 1}'] * 4, "over the requests limit of 3"),
    (['{"arrival": 0, "prompt": 600, "output": 1}'] * 2, "over the workload-tokens limit of 1,000"),
])
def test_a_trace_beyond_a_limit_or_malformed_is_refused_at_its_line(tmp_path, lines, words):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DoolyError, match=words):
        load_trace(path, Limits({"requests": 3, "workload-tokens": 1000}))


def test_a_trace_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b'{"arrival": 0, "prompt": 5, "output": 1}\n\xc3\x28\n')
    with pytest.raises(DoolyError, match="not UTF-8"):
        load_trace(path)


def test_a_run_is_stopped_at_its_steps_limit():
    requests = [Request(0, 0.0, 10, 50)]
    with pytest.raises(DoolyError, match="within 20 steps, the steps limit .* --limit steps=N"):
        simulate(requests, ContinuousBatching(64, 16, 8192, 8), lambda batch: 0.01, max_steps=20)
    assert len(simulate(requests, ContinuousBatching(64, 16, 8192, 8), lambda batch: 0.01, max_steps=60).steps) == 50


@pytest.mark.parametrize("argv, words", [
    (["--gpu-memory-gib", "nan"], ["--gpu-memory-gib must be a positive number, got nan"]),
    (["--gpu-memory-gib", "inf"], ["--gpu-memory-gib must be a positive number, got inf"]),
    (["--gpu-memory-gib", "-1"], ["--gpu-memory-gib must be a positive number"]),
    (["--max-batch-tokens", str(BIG)], ["--max-batch-tokens", "tokens-per-step limit"]),
    (["--max-requests", "100000"], ["--max-requests", "requests-per-step limit"]),
    (["--out", "{file}"], ["not a folder"]),
    (["--out", "{missing}/out"], ["parent folder", "does not exist"]),
    (["--limit", "tokens-per-step=x"], ["--limit tokens-per-step=x"]),
    (["--limit", "context-tokens=5"], ["unknown limit 'context-tokens'"]),
])
def test_simulate_options_are_checked_before_any_work(capsys, tmp_path, argv, words):
    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file", missing=tmp_path / "missing") for a in argv]
    code, err = run(capsys, "simulate", CONFIG, "--store", tmp_path / "none.sqlite", "--synthetic", "poisson:n=3",
                    *argv)
    one_error_line(code, err, *words)


def test_requests_past_the_models_context_are_named_in_one_warning(capsys):
    cfg = load_config(CONFIG)  # max_position_embeddings 131072
    requests = [Request(0, 0.0, 131_000, 100), Request(1, 0.0, 200_000, 1), Request(2, 0.0, 512, 128)]
    warn_beyond_context(requests, cfg)
    err = capsys.readouterr().err
    assert err.startswith("warning: 2 of 3 requests run past the model's context") and "131072" in err
    assert "200001 tokens" in err and len(err.strip().splitlines()) == 1
    warn_beyond_context(requests[2:], cfg)
    assert capsys.readouterr().err == ""


# --- ground truth -------------------------------------------------------------------------------------------------

def _truth():
    truth = json.loads(TRUTH.read_text())
    name = next(iter(truth["traces"]))
    truth["traces"] = {name: truth["traces"][name]}
    return truth


def _set(path, value):
    def change(truth):
        *parents, last = path
        node = truth
        for key in parents:
            node = node[next(iter(node))] if key == "*" else node[key]
        node[last] = value
    return change


@pytest.mark.parametrize("change, words", [
    (_set(["model"], "../configs/llama-3.2-1b"), "model must name a model of --models"),
    (_set(["backend"], 3), "backend must be a string"),
    (_set(["layers"], -1), "layers must be a positive integer"),
    (_set(["cb_config", "num_blocks"], "many"), "cb_config must hold positive integers"),
    (_set(["cb_config", "max_batch_tokens"], BIG), "over the tokens-per-step limit"),
    (_set(["cb_config", "safety_margin"], 3), "safety_margin"),
    (_set(["traces"], []), "traces must be a non-empty object"),
    (_set(["traces", "*", "requests"], [[0, 5]]), "a request is [arrival, prompt, output]"),
    (_set(["traces", "*", "requests"], [[0, 5, 10**9]]), "over the output-tokens limit"),
    (_set(["traces", "*", "requests"], [[0, BIG, 1]]), "over the prompt-tokens limit"),
    (_set(["traces", "*", "runs"], [{"steps": [{"queries": [5], "keys": [4], "forward_s": 0.1}], "requests": []}]),
     "need 1 <= query_tokens <= kv_tokens"),
    (_set(["traces", "*", "runs"], [{"steps": [{"queries": [1], "keys": [BIG], "forward_s": 0.1}], "requests": []}]),
     "over the context-tokens limit"),
    (_set(["traces", "*", "runs"], [{"steps": [{"queries": [1], "keys": [2], "forward_s": -1}], "requests": []}]),
     "positive forward_s"),
    (_set(["traces", "*", "runs"], [{"steps": [], "requests": [{"request_id": "r0", "arrival": 0,
                                                                  "token_times": ["x"]}]}]), "token_times"),
    (_set(["traces", "*", "runs"], [{"steps": [], "requests": [{"request_id": "r0", "arrival": 0, "token_times": [],
                                                                  "prompt": -1, "output": 1}]}]), "is not r<i>"),
    (_set(["traces", "*", "runs"], [{"steps": [], "requests": [{"request_id": "r999", "arrival": 0,
                                                                  "token_times": []}]}]), "is not r<i>"),
])
def test_a_malformed_ground_truth_file_is_refused(tmp_path, change, words):
    truth = _truth()
    change(truth)
    path = tmp_path / "x.json"
    path.write_text(json.dumps(truth))
    with pytest.raises(DoolyError, match=words.replace("[", r"\[").replace("]", r"\]")):
        read_groundtruth(path, Limits(), MODELS)


def test_a_ground_truth_file_as_written_reads_back():
    assert read_groundtruth(TRUTH, Limits(), MODELS)["model"] == "llama-3.2-1b"


@pytest.mark.parametrize("content, words", [
    (b"\xff", ["not UTF-8"]),
    (b"{", ["is not JSON"]),
    (b"[1, 2]", ["expected a JSON object"]),
])
def test_validate_refuses_a_file_that_is_not_ground_truth_before_opening_the_store(capsys, tmp_path, content, words):
    (tmp_path / "gt" / "sdpa").mkdir(parents=True)
    (tmp_path / "gt" / "sdpa" / "x.json").write_bytes(content)
    code, err = run(capsys, "validate", "--groundtruth", tmp_path / "gt", "--store", tmp_path / "none.sqlite",
                    "--models", ROOT / "golden")
    one_error_line(code, err, *words)


# --- output paths -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["validate", "--groundtruth", "{gt}", "--store", "{store}", "--models", "{golden}", "--plots", "{file}"],
     ["--plots", "not a folder"]),
    (["validate", "--groundtruth", "{gt}", "--store", "{store}", "--models", "{golden}", "--plots", "{missing}/p"],
     ["--plots", "parent"]),
    (["profile", IR, "--store", "{store}", "--out", "{file}"], ["--out", "not a folder"]),
    (["profile", IR, "--store", "{missing}/s.sqlite"], ["--store", "parent folder"]),
    (["profile", IR, "--store", "{gt}"], ["--store", "a folder, not a file"]),
    (["profile", IR, "--store", "{store}", "--budget-s", "nan"], ["--budget-s must be a positive number"]),
    (["profile", IR, "--store", "{store}", "--budget-s", "-5"], ["--budget-s must be a positive number"]),
    (["plan", IR, "--store", "{missing}/s.sqlite"], ["--store", "parent folder"]),
])
def test_an_output_path_that_cannot_be_written_is_refused_first(capsys, tmp_path, argv, words):
    (tmp_path / "gt").mkdir()
    (tmp_path / "file").write_text("")
    paths = {"gt": tmp_path / "gt", "store": tmp_path / "s.sqlite", "file": tmp_path / "file",
             "missing": tmp_path / "missing", "golden": ROOT / "golden"}
    code, err = run(capsys, *[str(a).format(**paths) for a in argv])
    one_error_line(code, err, *words)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "s.sqlite").exists()


def test_output_paths_that_can_be_written_pass(tmp_path):
    assert output_folder(tmp_path / "new", "--out") == tmp_path / "new"
    assert output_folder(tmp_path, "--out") == tmp_path
    assert output_file(tmp_path / "s.sqlite", "--store") == tmp_path / "s.sqlite"


@settings(max_examples=50, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(LIMITS)), st.integers(1, 2**31)))
def test_every_limit_is_checked_against_its_own_value(values):
    limits = Limits(values)
    for name in LIMITS:
        limits.check(name, limits[name], "at the limit")
        with pytest.raises(DoolyError, match=f"over the {name} limit"):
            limits.check(name, limits[name] + 1, "past it")
