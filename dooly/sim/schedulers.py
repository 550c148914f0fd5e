"""Batch schedulers of the engines Dooly simulates. Each picks, at every step, which requests run and how many of
their tokens, and keeps the KV cache's block accounting.

- `ContinuousBatching` follows transformers' FIFO scheduler (`generation/continuous_batching/scheduler.py`):
  decoding requests first, then requests part-way through their prefill, then waiting ones in arrival order;
  a step holds at most `max_batch_tokens` tokens (a prompt longer than what is left is split) and
  `max_requests_per_batch` requests, and reads at most the cache's size in keys; below `safety_margin` of free
  blocks only decoding requests (and one prefill) are taken; a request that cannot get its blocks waits.
- `VLLMv1` follows vLLM v1's scheduler: running requests first, each given what is left of its prefill up to the
  token budget (chunked prefill), or one token; then waiting requests while `max_num_seqs` and the budget allow;
  a running request that cannot get a block preempts the most recently admitted one, which is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .workload import Request


@dataclass
class State:
    request: Request
    cached: int = 0  # tokens whose keys are in the cache
    generated: int = 0
    blocks: int = 0
    recompute: int = 0  # generated tokens to prefill again after the request lost its cache
    token_times: list[float] = field(default_factory=list)

    @property
    def prefill_left(self) -> int:
        return max(0, self.request.prompt + self.recompute - self.cached)

    def evicted(self) -> None:
        """Lost its cache: its prompt and what it generated are prefilled again (the engines recompute)."""
        self.cached, self.recompute = 0, self.generated

    @property
    def decoding(self) -> bool:
        return self.prefill_left == 0 and self.generated > 0


@dataclass
class Scheduled:
    state: State
    tokens: int  # query tokens this step

    @property
    def keys(self) -> int:  # what the request's queries attend to: past plus new
        return self.state.cached + self.tokens

    @property
    def produces_token(self) -> bool:
        return self.tokens >= self.state.prefill_left


class Blocks:
    def __init__(self, num_blocks: int, block_size: int):
        self.total, self.free, self.size = num_blocks, num_blocks, block_size

    def needed(self, state: State, tokens: int) -> int:
        return max(0, -(-(state.cached + tokens) // self.size) - state.blocks)

    def take(self, state: State, tokens: int) -> bool:
        n = self.needed(state, tokens)
        if n > self.free:
            return False
        self.free -= n
        state.blocks += n
        return True

    def release(self, state: State) -> None:
        self.free += state.blocks
        state.blocks = 0


def preempt(state: State, blocks: Blocks, waiting: deque[State]) -> None:
    """Take a running request's cache away and queue it first, to prefill again (the engines recompute)."""
    blocks.release(state)
    state.evicted()
    waiting.appendleft(state)


class ContinuousBatching:
    def __init__(self, num_blocks: int, block_size: int = 256, max_batch_tokens: int = 8192,
                 max_requests_per_batch: int = 1024, safety_margin: float = 0.15):
        self.blocks = Blocks(num_blocks, block_size)
        self.max_tokens, self.max_requests, self.margin = max_batch_tokens, max_requests_per_batch, safety_margin
        self.active: dict[int, State] = {}  # insertion order, as the engine's dict
        self.waiting: deque[State] = deque()

    def add(self, request: Request) -> None:
        self.waiting.append(State(request))

    def pending(self) -> bool:
        return bool(self.active or self.waiting)

    def schedule(self) -> list[Scheduled]:
        budget, cache_budget, requests = self.max_tokens, self.blocks.total * self.blocks.size, self.max_requests
        decoding, prefilling = [], []
        for state in self.active.values():
            (decoding if state.decoding else prefilling).append(state)
        out: list[Scheduled] = []
        low = self.margin * self.blocks.total
        for i, state in enumerate(decoding + prefilling + list(self.waiting)):
            decodes = i < len(decoding)
            if not decodes and out and self.blocks.free < low:
                break
            tokens = 1 if decodes else min(state.prefill_left, budget)
            if cache_budget < state.cached:
                continue
            if not self.blocks.take(state, tokens):
                continue
            if state.request.id not in self.active:
                self.waiting.remove(state)
                self.active[state.request.id] = state
            out.append(Scheduled(state, tokens))
            budget -= tokens
            cache_budget -= state.cached
            requests -= 1
            if budget == 0 or cache_budget <= 0 or requests <= 0:
                break
        if not out and self.active:  # the cache is full: the engine offloads the latest request to make room
            victim = list(self.active.values())[-1]
            del self.active[victim.request.id]
            preempt(victim, self.blocks, self.waiting)
        return out

    def finish(self, state: State) -> None:
        self.blocks.release(state)
        del self.active[state.request.id]


class VLLMv1:
    def __init__(self, num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 8192,
                 max_num_seqs: int = 256):
        self.blocks = Blocks(num_blocks, block_size)
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.running: list[State] = []
        self.waiting: deque[State] = deque()

    def add(self, request: Request) -> None:
        self.waiting.append(State(request))

    def pending(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> list[Scheduled]:
        budget, out = self.max_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            state = self.running[i]
            tokens = min(state.prefill_left, budget) if state.prefill_left else 1
            while not self.blocks.take(state, tokens):
                victim = self.running.pop()  # preempt the latest admitted request
                preempt(victim, self.blocks, self.waiting)
                if victim is state:
                    break
            else:
                out.append(Scheduled(state, tokens))
                budget -= tokens
                i += 1
                continue
            break
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            state = self.waiting[0]
            tokens = min(state.prefill_left, budget)
            if not self.blocks.take(state, tokens):
                break
            self.waiting.popleft()
            self.running.append(state)
            out.append(Scheduled(state, tokens))
            budget -= tokens
        return out

    def finish(self, state: State) -> None:
        self.blocks.release(state)
        self.running.remove(state)
