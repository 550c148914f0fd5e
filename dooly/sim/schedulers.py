"""Batch schedulers of the engines Dooly simulates. Each picks, at every step, which requests run and how many of
their tokens, and keeps the KV cache's block accounting.

- `ContinuousBatching` follows transformers' FIFO scheduler (`generation/continuous_batching/scheduler.py`):
  decoding requests first, then requests part-way through their prefill, then waiting ones in arrival order;
  a step holds at most `max_batch_tokens` tokens (a prompt longer than what is left is split) and
  `max_requests_per_batch` requests, and reads at most the cache's size in keys; below `safety_margin` of free
  blocks only decoding requests (and one prefill) are taken; a request that cannot get its blocks waits.
- `VLLMv1` follows vLLM 0.24's V1 scheduler step for step (tests/test_vllm_scheduler.py runs vLLM's own beside it):
  running requests first, in admission order, each given what is left of its prefill up to the token budget
  (chunked prefill) or one token; a running request that cannot get its blocks preempts the latest admitted one,
  which is recomputed later (its cached blocks may still be hits then), and a step that preempted admits nobody;
  then waiting requests first come, first served, while `max_num_seqs` and the budget allow, each only if its
  whole sequence fits in the free blocks, less what the prefix cache already holds. With async scheduling (on by
  default) a step is scheduled before the previous one's tokens are read back: a request that finished there
  still holds its blocks and its seat for one more step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import DoolyError
from .vllm_cache import BlockPool
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


@dataclass
class VLLMState(State):
    table: list[int] = field(default_factory=list)  # the request's KV cache blocks, in order
    hashed: int = 0  # leading blocks of `table` entered in the prefix cache
    hashes: list[int] = field(default_factory=list)  # the hash chain of the request's full blocks, as far as computed
    tokens: Sequence[int] | None = None  # the prompt's token ids, where prefixes are shared
    running: bool = False
    finishing: bool = False  # its last token is computed but not yet read back (async scheduling)
    unread: bool = False  # its newest token is not yet read back (async scheduling)

    @property
    def length(self) -> int:  # the engine's `num_tokens`: prompt and generated tokens
        return self.request.prompt + self.generated

    def block_hash(self, i: int, size: int) -> int:
        """The hash of the request's i-th block and everything before it. Generated tokens are the request's own."""
        while len(self.hashes) <= i:
            j = len(self.hashes)
            end = (j + 1) * size
            content = (tuple(self.tokens[j * size:end]) if self.tokens is not None and end <= self.request.prompt
                       else ("request", self.request.id, j))
            self.hashes.append(hash((self.hashes[-1] if self.hashes else None, content)))
        return self.hashes[i]


class VLLMv1:
    """vLLM 0.24's V1 scheduler (`v1/core/sched/scheduler.py`, FCFS, chunked prefill) over its block pool.

    Defaults are the offline engine's on an H100/H200: a 16,384-token budget, 1,024 sequences, prefix caching and
    async scheduling on, no long-prefill threshold, no watermark. `prompt_tokens` gives prompts' token ids by
    request id, for prefixes shared between requests; other requests share nothing.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 16384,
                 max_num_seqs: int = 1024, enable_prefix_caching: bool = True, async_scheduling: bool = True,
                 long_prefill_token_threshold: int = 0, watermark: float = 0.0,
                 prompt_tokens: Mapping[int, Sequence[int]] | None = None):
        self.blocks = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.threshold, self.async_scheduling = long_prefill_token_threshold, async_scheduling
        self.watermark_blocks = int(watermark * num_blocks)
        self.prompt_tokens = prompt_tokens or {}
        self.running: list[VLLMState] = []
        self.waiting: deque[VLLMState] = deque()
        self.unread: list[VLLMState] = []  # the previous step's requests whose token is not read back yet
        self.finishing = 0

    def add(self, request: Request) -> None:
        tokens = self.prompt_tokens.get(request.id)
        if tokens is not None and len(tokens) != request.prompt:
            raise DoolyError(f"request {request.id}: {len(tokens)} prompt token ids for a prompt of {request.prompt}")
        self.waiting.append(VLLMState(request, tokens=tokens))

    def pending(self) -> bool:
        if self.waiting or len(self.running) > self.finishing:
            return True
        self._read_back()  # the engine's last, empty step: it reads the final tokens back and frees their blocks
        return False

    def schedule(self) -> list[Scheduled]:
        """One step. With async scheduling the engine schedules it before reading back the previous step's tokens:
        requests finished there still hold their blocks and seats, and their tokens are not known yet."""
        while True:
            out, preempted = self._schedule()
            freed = self._read_back()
            for s in out:
                s.state.unread = self.async_scheduling and s.produces_token
            self.unread = [s.state for s in out if s.state.unread]
            if out or not (preempted or freed):  # an empty step changed nothing the next one could use
                return out

    def finish(self, state: VLLMState) -> None:
        if self.async_scheduling:
            state.finishing = True
            self.finishing += 1
        else:
            self._free(state)

    def _schedule(self) -> tuple[list[Scheduled], bool]:
        budget, out, preempted, i = self.max_tokens, [], False, 0
        while i < len(self.running) and budget > 0:
            state = self.running[i]
            if state.finishing:
                i += 1
                continue
            tokens = min(self._capped(state.prefill_left or 1), budget)
            while not self._grow(state, tokens):
                victim = self.running.pop()  # the latest admitted
                self._preempt(victim)
                preempted = True
                if victim is state:
                    break
            else:
                out.append(Scheduled(state, tokens))
                budget -= tokens
                i += 1
                continue
            break
        if preempted:  # the engine admits nobody in a step that preempted
            return out, True
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            state = self.waiting[0]
            hits = self._hits(state)
            tokens = min(self._capped(state.length - len(hits) * self.blocks.size), budget)
            if not self._admit(state, hits, tokens):
                break
            self.waiting.popleft()
            self.running.append(state)
            state.running = True
            out.append(Scheduled(state, tokens))
            budget -= tokens
        return out, False

    def _capped(self, tokens: int) -> int:
        return self.threshold if 0 < self.threshold < tokens else tokens

    def _known(self, state: VLLMState) -> int:
        return state.length - state.unread

    def _grow(self, state: VLLMState, tokens: int) -> bool:
        pool, end = self.blocks, state.cached + tokens
        need = -(-end // pool.size) - len(state.table)
        if need > 0:
            if need > pool.free:
                return False
            state.table += pool.take(need)
        self._cache(state, min(end, self._known(state)))
        return True

    def _hits(self, state: VLLMState) -> list[int]:
        if not self.blocks.caching:
            return []
        size = self.blocks.size
        return self.blocks.hits(state.block_hash(j, size) for j in range((state.length - 1) // size))

    def _admit(self, state: VLLMState, hits: list[int], tokens: int) -> bool:
        """Blocks for a waiting request's first chunk, if its whole sequence fits (`scheduler_reserve_full_isl`)."""
        pool = self.blocks
        reserve = self.watermark_blocks if self.running else 0
        whole = -(-state.length // pool.size)
        if max(whole - len(hits), 0) + pool.evictable(hits) + reserve > pool.free:
            return False
        pool.touch(hits)
        state.cached, state.hashed = len(hits) * pool.size, len(hits)
        state.table = hits + pool.take(max(-(-(state.cached + tokens) // pool.size) - len(hits), 0))
        self._cache(state, min(state.cached + tokens, self._known(state)))
        return True

    def _cache(self, state: VLLMState, tokens: int) -> None:
        """Enter the request's blocks that the first `tokens` tokens fill in the prefix cache."""
        full = tokens // self.blocks.size
        if not self.blocks.caching or full <= state.hashed:
            return
        for j in range(state.hashed, full):
            self.blocks.cache(state.table[j], state.block_hash(j, self.blocks.size))
        state.hashed = full

    def _preempt(self, state: VLLMState) -> None:
        self.blocks.release(state.table)
        state.table, state.hashed, state.running = [], 0, False
        if state.finishing:  # finished in the step in flight: the engine drops it when its token arrives
            self.finishing -= 1
            return
        state.evicted()
        self.waiting.appendleft(state)

    def _free(self, state: VLLMState) -> None:
        self.blocks.release(state.table)
        state.table, state.running = [], False
        self.running.remove(state)

    def _read_back(self) -> bool:
        """The engine reads the previous step's tokens back: their blocks become cacheable, finished requests leave.
        Whether any blocks came free."""
        freed = False
        for state in self.unread:
            state.unread = False
            if not state.running:
                continue
            self._cache(state, state.cached)
            if state.finishing:
                self.finishing -= 1
                self._free(state)
                freed = True
        self.unread = []
        return freed


def engine_scheduler(kind: str, num_blocks: int, block_size: int, max_tokens: int, max_seqs: int):
    """The scheduler of engine `kind` (`cb`: transformers' continuous batching, `vllm`: vLLM's V1) with a step's
    token and request budgets; transformers' engine also holds a step to one request a block and a token."""
    if kind == "cb":
        return ContinuousBatching(num_blocks, block_size, max_tokens, min(max_seqs, max_tokens, num_blocks))
    return VLLMv1(num_blocks, block_size, max_tokens, max_seqs)
