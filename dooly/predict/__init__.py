"""Prediction: op latencies from the store, step latency of any batch, the engine's host time."""

from ..environment import environment_name
from .step import Batches, Prediction, Predictor, load_predictor


def step_latency(model_ir, batch: list[tuple[int, int]], store, backend: str | None = None) -> float:
    """Predicted µs of one engine step serving `batch` (per request: query tokens, keys attended to), on the
    store's measurements of `backend` (default: the engine's default SDPA)."""
    return float(load_predictor(model_ir, store, environment_name(store, backend)).predict([batch]).parts.total_us[0])


__all__ = ["Batches", "Prediction", "Predictor", "environment_name", "load_predictor", "step_latency"]
