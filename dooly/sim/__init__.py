"""Simulators of continuous-batching engines driven by Dooly's step latencies."""

from .schedulers import ContinuousBatching, VLLMv1, engine_scheduler
from .simulator import EngineSettings, StepTime, simulate, summary
from .workload import Request, load_trace, synthetic

__all__ = ["ContinuousBatching", "EngineSettings", "Request", "StepTime", "VLLMv1", "load_trace", "simulate", "summary",
           "synthetic", "engine_scheduler"]
