"""The `dooly` command: one subcommand per stage of the pipeline."""

from __future__ import annotations

import sys

COMMANDS = {
    "compile": ("dooly.compile", "capture a model's serving step and write its annotated IR"),
    "plan": ("dooly.plan", "what profiling models would cost, with the store and without Dooly"),
    "profile": ("dooly.profile", "measure, on a GPU, the op signatures a store does not have yet"),
    "store": ("dooly.store.cli", "inspect, export, import and re-measure a latency store"),
    "fit": ("dooly.predict.cli:fit_main", "fit the store's regressors and print their cross-validated error"),
    "predict": ("dooly.predict.cli:predict_main", "predicted latency of engine steps, op by op"),
    "simulate": ("dooly.sim.cli", "serve a request trace or synthetic workload in the simulated engine"),
    "explore": ("dooly.explore", "search engine configurations for the best throughput per GPU under latency SLOs"),
    "export-vidur": ("dooly.sim.cli:vidur_main", "write Vidur's profiling CSVs for a model from Dooly's predictions"),
    "groundtruth": ("dooly.bench.cli:groundtruth_main", "record, on a GPU, the engine serving the validation traces"),
    "validate": ("dooly.validate", "Dooly's predictions against the engine's measured ground truth"),
    "transfer": ("dooly.predict.transfer", "carry a store to a new GPU or environment from a few calibration points"),
    "compare": ("dooly.compare", "one model on two stores or environments side by side: steps and a workload"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help}" for name, (_, help) in COMMANDS.items())
    return f"usage: dooly COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n'dooly COMMAND --help' for a command's options"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    return getattr(__import__(module, fromlist=["_"]), function or "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
