"""Coverage: compile transformers' default config of every registered causal-LM architecture, shrunk.

    python tools/architectures.py [--only T ...] [--timeout S] [--out out/architectures.jsonl] [--engine]

Each architecture runs in a process of its own (with a time limit): its default config
(`AutoConfig.for_model(t)`), its text part shrunk to a few small layers, compiled by Dooly; `--engine` also runs
transformers' continuous-batching engine itself on it (`generate_batch` with random weights, on the CPU). Prints a
table: compiled / refused (the reason) / failed (the reason), with counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "vocab_size": 256, "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_routed_experts": 4}
LAYERS = 2


def shrunk(model_type: str) -> dict:
    """The default config of `model_type`, its text model cut to LAYERS small layers, as a config.json dict."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    depth = text.num_hidden_layers
    for name, value in vars(text).copy().items():
        if isinstance(value, list) and len(value) == depth:
            setattr(text, name, value[:LAYERS])
    text.num_hidden_layers = LAYERS
    text.pad_token_id = None  # a default id past the shrunk vocabulary
    # a causal LM of an encoder family (BERT's) attends both ways unless told it decodes, as its class warns
    text.is_decoder = True
    for name, value in SMALL.items():
        if isinstance(getattr(text, name, None), int) and not isinstance(getattr(type(text), name, None), property):
            setattr(text, name, value)
    data = config.to_dict()
    data["model_type"] = model_type
    return data


def run_engine(data: dict) -> str:
    """'ok' when the continuous-batching engine generates what `generate` does with this model, with the same log
    probabilities, else why not.

    Tokens alone do not tell: a random model's few greedy tokens often repeat one token whatever the context, so a
    model that ignores the engine's paged cache (its decode steps see only their new tokens) can still pick them;
    its log probabilities differ (by 4e-3 to 0.2 on falcon, mpt, openai-gpt, against under 1e-6 where the cache is
    read).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching import cache

    # the engine sizes its cache from free accelerator memory, which a CPU does not report
    cache.PagedAttentionMemoryHandler.get_available_memory = lambda self: 1 << 30
    torch.manual_seed(0)  # random weights: the same model and prompts on every run of the table
    config = AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(config).eval()
    vocab = config.get_text_config().vocab_size
    inputs = [torch.randint(3, vocab, (n,)).tolist() for n in (5, 9)]
    # no end-of-sequence token for either: the engine does not mask it as `min_new_tokens` makes generate do, so a
    # random model that picks it would differ for that reason alone
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate_batch(inputs, generation_config=generation,
                               continuous_batching_config=ContinuousBatchingConfig(
                                   block_size=32, num_blocks=16, max_batch_tokens=64, return_logprobs=True),
                               progress_bar=False)
    got = sorted((list(o.generated_tokens), o.logprobs) for o in out.values())
    want = []
    for ids in inputs:
        done = model.generate(torch.tensor([ids]), generation_config=generation, output_logits=True,
                              return_dict_in_generate=True)
        tokens = done.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(done.logits, tokens)]
        want.append((tokens, logprobs))
    want.sort()
    if [tokens for tokens, _ in got] != [tokens for tokens, _ in want]:
        return "differs from generate"
    gap = max(abs(a - b) for (_, x), (_, y) in zip(got, want) for a, b in zip(x, y))
    return "ok" if gap < 1e-4 else f"differs from generate (log probabilities by up to {gap:.1e})"


def one(model_type: str, engine: bool) -> dict:
    from dooly.compile import compile_model
    from dooly.config import first_line, parse_config
    from dooly.errors import DoolyError

    row = {"model_type": model_type}
    try:
        data = shrunk(model_type)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {**row, "status": "no default", "reason": first_line(e)}
    if engine:
        try:
            row["engine"] = run_engine(data)
        except Exception as e:  # noqa: BLE001 - reported in the table
            row["engine"] = first_line(e)
    try:
        graph = compile_model(parse_config(data, model_type, model_type))
    except DoolyError as e:
        return {**row, "status": "refused", "reason": str(e).split(": ", 2)[-1]}
    except Exception as e:  # noqa: BLE001 - a bug of Dooly's: reported in the table
        return {**row, "status": "failed", "reason": first_line(e)}
    return {**row, "status": "compiled", "ops": len(graph.ops), "attention": graph.meta.attention}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types (default: every registered causal LM)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per architecture")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "architectures.jsonl")
    parser.add_argument("--engine", action="store_true", help="also run the engine itself on each")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.engine)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with args.out.open("w") as out:
        for t in types:
            cmd = [sys.executable, __file__, "--one", t] + (["--engine"] if args.engine else [])
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                lines = done.stdout.strip().splitlines()
                row = json.loads(lines[-1]) if lines else {
                    "model_type": t, "status": "failed", "reason": (done.stderr.strip().splitlines() or ["?"])[-1]}
            except subprocess.TimeoutExpired:
                row = {"model_type": t, "status": "failed", "reason": f"over {args.timeout} s"}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    table(rows)
    return 0


def table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="transformers causal-LM architectures, default configs shrunk")
    for column in ("model_type", "Dooly", "engine", "reason"):
        t.add_column(column)
    for row in rows:
        t.add_row(row["model_type"], row["status"], row.get("engine", ""), row.get("reason", "")[:100])
    console = Console()
    console.print(t)
    counts = Counter(row["status"] for row in rows)
    engine = sum(row.get("engine") == "ok" for row in rows)
    console.print(", ".join(f"{k} {v}" for k, v in counts.most_common()) + f" of {len(rows)}"
                  + (f"; the engine itself runs {engine}" if any("engine" in r for r in rows) else ""))


if __name__ == "__main__":
    sys.exit(main())
