"""Run Vidur (PyPI `vidur` 0.0.26, in its own venv) on profiling files that `dooly export-vidur` wrote: the helper
`tests/test_vidur.py` runs with Vidur's Python (it imports nothing of Dooly's or of the tests').

    .venv-vidur/bin/python tests/vidur_run.py out/vidur --model llama-3.1-8b --requests 64 --out out/vidur-run

Vidur 0.0.26 reads its profiles from Hugging Face datasets (a folder with `config.json`, `mlp.csv.xz`,
`attention.csv.xz`) and knows models by registered name. This makes such a folder from the export, registers
the exported model's dimensions under its own name, points Vidur's dataset download at the local folders (no
network), and runs one simulation: one replica, TP=1, no pipeline, Poisson arrivals of fixed-length requests.
It prints a JSON line with what Vidur reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

COMPUTE_DATASET = "dooly/compute"
NETWORK_DATASET = "dooly/network"
NETWORK_DEVICE = "h100_dgx"


def register_model(spec: dict):
    from vidur.config.model_config import Llama2ModelConfig

    name = spec["name"]
    fields = {"num_layers": spec["num_layers"], "num_q_heads": spec["n_head"], "num_kv_heads": spec["n_kv_head"],
              "embedding_dim": spec["n_embd"], "mlp_hidden_dim": spec["n_expanded_embd"],
              "max_model_len": spec["max_model_len"], "vocab_size": spec["vocab_size"],
              "use_gated_mlp": bool(spec["use_gated_mlp"])}
    cls = dataclasses.make_dataclass(
        "DoolyExportedModelConfig", [(k, type(v), dataclasses.field(default=v)) for k, v in fields.items()],
        bases=(Llama2ModelConfig,), namespace={"get_name": staticmethod(lambda: name)})
    return cls


def datasets(export: Path, device: str, model: str, work: Path) -> dict[str, Path]:
    import pandas as pd

    compute, network = work / "compute", work / "network"
    compute.mkdir(parents=True, exist_ok=True)
    network.mkdir(parents=True, exist_ok=True)
    source = export / "compute" / device / model
    for name in ("mlp", "attention"):
        pd.read_csv(source / f"{name}.csv").to_csv(compute / f"{name}.csv.xz", index=False, compression="xz")
    (compute / "config.json").write_text(json.dumps({"model": model, "device_sku": device}))
    (network / "config.json").write_text(json.dumps({"sku": NETWORK_DEVICE}))
    return {COMPUTE_DATASET: compute, NETWORK_DATASET: network}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="the --out folder of dooly export-vidur")
    parser.add_argument("--model", required=True, help="the exported model's name (its folder)")
    parser.add_argument("--device", default="h100")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--qps", type=float, default=4.0)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("out/vidur-run"))
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "disabled"
    spec = json.loads((args.export / "compute" / args.device / args.model / "model.json").read_text())
    model_config = register_model(spec)  # noqa: F841 - Vidur finds it among the subclasses, which are weak references
    folders = datasets(args.export, args.device, args.model, args.out / "datasets")

    import vidur.execution_time_predictor.sklearn_execution_time_predictor as predictor
    from vidur.config import SimulationConfig
    from vidur.simulator import Simulator
    from vidur.utils.random import set_seeds

    predictor.snapshot_download = lambda repo_id, **kwargs: str(folders[repo_id])
    p = "--random_forrest_execution_time_predictor_config_"
    sys.argv = ["vidur", "--replica_config_model_name", args.model, "--replica_config_device", args.device,
                "--replica_config_network_device", NETWORK_DEVICE, "--replica_config_num_pipeline_stages", "1",
                "--replica_config_tensor_parallel_size", "1", "--cluster_config_num_replicas", "1",
                "--request_generator_config_type", "synthetic",
                "--synthetic_request_generator_config_num_requests", str(args.requests),
                "--length_generator_config_type", "fixed",
                "--fixed_request_length_generator_config_prefill_tokens", str(args.prefill),
                "--fixed_request_length_generator_config_decode_tokens", str(args.decode),
                "--interval_generator_config_type", "poisson",
                "--poisson_request_interval_generator_config_qps", str(args.qps),
                "--replica_scheduler_config_type", "vllm",
                "--execution_time_predictor_config_type", "random_forrest",
                f"{p}model_profiling_dataset", COMPUTE_DATASET, f"{p}network_profiling_dataset", NETWORK_DATASET,
                f"{p}cache_dir", str(args.out / "cache"), f"{p}prediction_max_tokens_per_request", "8192",
                f"{p}prediction_max_prefill_chunk_size", "4096", f"{p}k_fold_cv_splits", "3",
                f"{p}num_estimators", "32", f"{p}max_depth", "16", f"{p}min_samples_split", "2",
                "--cache_config_block_size", str(spec["block_size"]),
                "--metrics_config_output_dir", str(args.out / "metrics"), "--no-metrics_config_store_plots",
                "--no-metrics_config_write_json_trace", "--no-metrics_config_enable_chrome_trace"]
    config = SimulationConfig.create_from_cli_args()
    set_seeds(config.seed)
    simulator = Simulator(config)
    simulator.run()
    metrics = sorted((args.out / "metrics").rglob("request_metrics.csv"))
    import pandas as pd

    frame = pd.read_csv(metrics[-1]) if metrics else None
    print(json.dumps({"model": args.model, "requests": None if frame is None else len(frame),
                      "metrics": str(metrics[-1]) if metrics else None,
                      "columns": [] if frame is None else list(frame.columns),
                      "mean_e2e_s": None if frame is None else float(frame["request_e2e_time"].mean()),
                      "mean_ttft_s": None if frame is None else float(frame["prefill_e2e_time"].mean())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
