"""Continuous batching: which request sits in which slot, and what each slot feeds next.

The scheduler is plain Python (no JAX): the engine asks it for a ``Plan``
before every step and reports the sampled tokens back.

1. ``submit`` queues a request (``QueueFull`` past ``max_waiting``).
2. ``plan`` first moves queued requests into free slots (FIFO; a new one is
   marked ``reset`` so the model forgets the slot's previous occupant), then
   gives every occupied slot its input: the next chunk of at most
   ``max_chunk`` prompt tokens while the prompt is being prefilled, else the
   last generated token. S = the smallest bucket that holds the longest input,
   so decoding rows advance every step even while a long prompt is prefilled
   in chunks beside them. With ``row_buckets`` the plan covers only slots
   0..R-1, R the smallest row bucket (1, 2, 4, ..., num_slots) past the last
   busy slot: requests take the lowest free slot, so a lone request is a
   one-row step, not one row of num_slots.
3. ``commit`` records what the step did: prompt tokens consumed, and for rows
   whose prompt is complete the sampled token. The engine decides when a
   request is done and calls ``release``.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from serve.sampling import SamplingParams, split_seed


class QueueFull(RuntimeError):
    """The waiting queue is at capacity (HTTP 429)."""


@dataclass(eq=False)
class Request:
    """One generation: its prompt, parameters, and progress."""

    prompt: list[int]
    params: SamplingParams
    on_update: Callable[["Request"], None] | None = None   # called (engine thread) after new tokens
    id: int = -1
    generated: list[int] = field(default_factory=list)
    fed: int = 0                      # prompt tokens already in the model
    slot: int | None = None
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' | 'error'
    text: str = ""
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass(frozen=True)
class Plan:
    """Inputs of one step, as numpy arrays over slots 0..B-1 (B: a row bucket; the slots
    past B are idle)."""

    tokens_BS: np.ndarray
    lengths_B: np.ndarray
    reset_B: np.ndarray
    temperature_B: np.ndarray
    top_p_B: np.ndarray
    top_k_B: np.ndarray
    seed_B2: np.ndarray
    index_B: np.ndarray
    rows: tuple[Request | None, ...]        # the request in each slot (None: idle)

    @property
    def seq_len(self) -> int:
        return self.tokens_BS.shape[1]


def buckets_for(max_chunk: int) -> tuple[int, ...]:
    """Step widths: 1 (decode), then 16, 64, 256, ... below max_chunk, then max_chunk."""
    return tuple(dict.fromkeys([1, *(s for s in (16, 64, 256, 1024) if s < max_chunk), max_chunk]))


def row_buckets_for(num_slots: int) -> tuple[int, ...]:
    """Step heights: 1, 2, 4, ... below num_slots, then num_slots."""
    return tuple(dict.fromkeys([*(1 << i for i in range(num_slots.bit_length()) if 1 << i < num_slots),
                                num_slots]))


class Scheduler:
    """Fixed slots, a FIFO queue, chunked prefill (see module docstring)."""

    def __init__(self, num_slots: int, max_chunk: int, max_waiting: int = 256, row_buckets: bool = False):
        # max_waiting >= 1 too: a request waits in the queue until a step admits it to a slot,
        # so with no room there every submit is refused and generate() would wait forever
        for name, value in (("num_slots", num_slots), ("max_chunk", max_chunk), ("max_waiting", max_waiting)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_slots, self.max_chunk, self.max_waiting = num_slots, max_chunk, max_waiting
        self.buckets = buckets_for(max_chunk)
        self.row_buckets = row_buckets_for(num_slots) if row_buckets else (num_slots,)
        self.slots: list[Request | None] = [None] * num_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self._fresh: set[int] = set()

    def submit(self, request: Request) -> Request:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue holds {len(self.waiting)} waiting requests (limit {self.max_waiting})")
        request.id = next(self._ids)
        request.submitted_at = time.perf_counter()
        self.waiting.append(request)
        return request

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active > 0

    def _admit(self) -> None:
        for slot in range(self.num_slots):
            while self.slots[slot] is None and self.waiting:
                request = self.waiting.popleft()
                if request.done:          # cancelled while waiting
                    continue
                request.slot = slot
                self.slots[slot] = request
                self._fresh.add(slot)

    def plan(self) -> Plan | None:
        """The next step's inputs, or None when there is nothing to run."""
        self._admit()
        if self.active == 0:
            return None
        last_busy = max(slot for slot, request in enumerate(self.slots) if request is not None)
        b = next(rows for rows in self.row_buckets if rows > last_busy)
        slots = self.slots[:b]
        inputs = []
        for request in slots:
            if request is None:
                inputs.append([])
            elif request.prefilling:
                inputs.append(request.prompt[request.fed:request.fed + self.max_chunk])
            else:
                inputs.append(request.generated[-1:])
        need = max(len(x) for x in inputs)
        width = next(w for w in self.buckets if w >= need)
        tokens = np.zeros((b, width), np.int32)
        for row, x in enumerate(inputs):
            tokens[row, :len(x)] = x
        params = [r.params if r is not None else SamplingParams() for r in slots]
        plan = Plan(
            tokens_BS=tokens,
            lengths_B=np.array([len(x) for x in inputs], np.int32),
            reset_B=np.array([row in self._fresh for row in range(b)]),
            temperature_B=np.array([p.temperature for p in params], np.float32),
            top_p_B=np.array([p.top_p for p in params], np.float32),
            top_k_B=np.array([p.top_k for p in params], np.int32),
            seed_B2=np.array([split_seed(p.seed) for p in params], np.uint32),
            index_B=np.array([len(r.generated) if r else 0 for r in slots], np.int32),
            rows=tuple(slots))
        self._fresh.clear()
        return plan

    def commit(self, plan: Plan, next_B: np.ndarray) -> list[Request]:
        """Record a finished step; returns the requests that received a new token."""
        updated = []
        for row, request in enumerate(plan.rows):
            if request is None or request.done:
                continue
            if request.prefilling:
                request.fed += int(plan.lengths_B[row])
                if request.prefilling:
                    continue             # more prompt chunks to go: the sample is meaningless
            request.generated.append(int(next_B[row]))
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            updated.append(request)
        return updated

    def release(self, request: Request) -> None:
        """Free the slot of a finished (or cancelled) request."""
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
        request.slot = None
        if request in self.waiting:
            self.waiting.remove(request)
