"""How `dooly explore` shows a search: the Pareto front as a table, and every simulated configuration as a plot of
throughput per GPU against latency."""

from __future__ import annotations

from pathlib import Path

from .explore import GRID_AXES, Objective


def varying(rows: list[dict]) -> list[str]:
    """The grid axes whose value differs between rows (the others go in the caption)."""
    return [a for a in GRID_AXES if len({r[a] for r in rows}) > 1]


def _value(axis: str, v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def plot(rows: list[dict], front: list[dict], latency: Objective, objectives: list[Objective], path: Path,
         model: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    simulated = [r for r in rows if "throughput_per_gpu" in r and latency.value(r) is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for meets, colour, label in ((False, "tab:gray", "misses the SLO"), (True, "tab:blue", "meets the SLO")):
        pts = [(latency.value(r), r["throughput_per_gpu"]) for r in simulated if r["meets_slo"] == meets]
        if pts:
            ax.scatter(*zip(*pts), s=12, alpha=0.6, color=colour, label=label)
    if front:
        ax.step([latency.value(r) for r in front], [r["throughput_per_gpu"] for r in front], where="post",
                color="tab:red", marker="o", label="Pareto front")
    limit = next((o.limit_ms for o in objectives if o.name == latency.name), None)
    if limit is not None:
        ax.axvline(limit, color="tab:red", ls="--", lw=0.8, label=f"SLO {latency.name} {limit:g} ms")
    stopped = len(rows) - len(simulated)
    ax.set_xlabel(f"{latency.name.upper().replace('_', ' ')} (ms)")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{model}: {len(rows)} configurations ({stopped} stopped once they missed the SLO)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(report: dict, rows: list[dict], out: Path, figure: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    axes = varying(rows) or ["backend"]
    fixed = ", ".join(f"{a}={_value(a, rows[0][a])}" for a in GRID_AXES if a not in axes) if rows else ""
    metrics = list(dict.fromkeys([*report["slo"], report["latency"]]))
    table = Table(title=f"{report['model']}: Pareto front of {report['meet_slo']} configurations meeting "
                        + ", ".join(f"{k} <= {v:g} ms" for k, v in report["slo"].items()), caption=fixed)
    for col in [*axes, *(f"{m} (ms)" for m in metrics), "tok/s/GPU"]:
        table.add_column(col, justify="left" if col in axes else "right")
    for r in reversed(report["front"]):  # the highest throughput first
        table.add_row(*(_value(a, r[a]) for a in axes),
                      *(f"{r[m.rsplit('_', 1)[0] + '_ms'][m.rsplit('_', 1)[1]]:.1f}" for m in metrics),
                      f"{r['throughput_per_gpu']:.1f}")
    console = Console()
    console.print(table)
    if not report["front"]:
        console.print("[yellow]no configuration of the grid meets the SLO[/yellow]")
    console.print(f"{report['configurations']} configurations x {report['requests']} requests: "
                  f"{report['simulated']} simulated, {report['resumed']} resumed from {out / 'results.jsonl'}, "
                  f"{report['meet_slo']} meet the SLO, {len(report['front'])} on the front; "
                  f"{report['retried_tasks']} tasks retried; {report['seconds']:.1f} s")
    console.print(f"wrote {out / 'front.json'}, {figure}")
