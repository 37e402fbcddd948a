"""``serve.Engine``: a model, a tokenizer and a continuous-batching loop.

    engine = serve.Engine.load("serving/tiny")
    outs = engine.generate(["def main(", "import os\\n"], max_new_tokens=64)
    outs[0].tokens, outs[0].text, outs[0].finish_reason

The engine owns the model (``engine.model``): a later stage may swap each MoE
layer's experts object (``replace_experts``) and observe every step
(``step_hooks``); ``extra_stats`` is where such a stage reports its figures.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.experts import quantize_experts
from moejax.model import Transformer
from moejax.validate import as_int
from serve import runner as runner_lib
from serve.export import ExportError, key_of, read_checkpoint
from serve.metrics import EngineMetrics
from serve.sampling import RequestError, SamplingParams, checked_text
from serve.scheduler import Plan, QueueFull, Request, Scheduler
from serve.tokenizer import load_tokenizer


def _token_id(t) -> int:
    """A token id as a Python int (ints and numpy / JAX integer scalars; bools and floats: TypeError)."""
    token = as_int(t)
    if token is None:
        raise TypeError(f"{t!r} is not a token id")
    return token


_log = logging.getLogger(__name__)


class EngineConfigError(ValueError):
    """An Engine argument is out of range (the CLI reports it in one line, exit 2)."""


def _context_length(max_len: int | None, model_max: int) -> int:
    """Tokens per slot: ``max_len``, or the model's ``max_seq_len`` when None (never past it)."""
    if max_len is None:
        return model_max
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or not 1 <= max_len <= model_max:
        raise EngineConfigError(f"max_len must be an integer in [1, {model_max}] (the model's max_seq_len) "
                         f"or None for all of it, got {max_len!r}")
    return int(max_len)


def _notice_token_dropping(cfg) -> None:
    """Say so when the MoE drops tokens past a capacity: which ones it drops depends on every
    token of the step -- the other requests' and the step's padding -- so a request's tokens
    do too (greedy ones included)."""
    factor = getattr(getattr(cfg, "moe", None), "capacity_factor", None)
    if factor is not None:
        _log.warning(f"MoE capacity_factor={factor} drops tokens: a request's output depends on the requests "
                     f"batched with it; serve a dropless config (capacity_factor=None) for results that do not")


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class Output:
    tokens: list[int]
    text: str
    finish_reason: str              # 'stop' (EOS or a stop string) | 'length' | 'cancelled' | 'error'
    prompt_tokens: int
    time_to_first_token: float | None
    latency: float


class Engine:
    """Generation over a fixed batch of slots.

    1. Requests are tokenized, checked against the context (``max_len``) and
       queued in the scheduler.
    2. Each step the scheduler fills free slots and hands every busy slot its
       input (a prompt chunk or the last token); one jitted step (per width
       bucket and row bucket) runs the model on the slots up to the last busy
       one (``row_buckets``; else on all) and samples each row's next token
       with that request's own parameters and key.
    3. Finished requests (EOS, a stop string, ``max_new_tokens``) leave their
       slot at once; the next queued request takes it at the next step.
    A request's tokens do not depend on the other requests in the batch, unless
    the MoE drops tokens past a capacity (``capacity_factor`` set: a warning says so).
    ``generate`` drives steps in the caller's thread; ``start`` runs the same
    loop in a background thread that ``submit`` (e.g. the HTTP server) feeds.
    """

    def __init__(self, model: Transformer, tokenizer, *, num_slots: int = 8, max_len: int | None = None,
                 max_chunk: int = 64, max_waiting: int = 256, row_buckets: bool = True, runner=None):
        self.model, self.cfg, self.tokenizer = model, model.cfg, tokenizer
        _notice_token_dropping(self.cfg)
        self.max_len = _context_length(max_len, self.cfg.max_seq_len)
        max_chunk = min(max_chunk, self.max_len)
        self.runner = runner_lib.make_runner(model, num_slots, self.max_len, max_chunk, runner)
        # row buckets: a step covers the slots up to the last busy one (rounded up to a power of 2),
        # where the runner can step a part of its rows
        self.scheduler = Scheduler(num_slots, max_chunk, max_waiting,
                                   row_buckets=row_buckets and getattr(self.runner, "row_buckets", False))
        self.metrics = EngineMetrics(num_slots)
        self.step_hooks: list[Callable[["Engine", Plan], None]] = []
        self.extra_stats: dict[str, Callable[[], dict]] = {}
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.source = "moejax"
        self._build()

    # ------------------------------------------------------------------ model
    @classmethod
    def load(cls, directory: str | Path, offload=None, **kwargs) -> "Engine":
        """An engine over a serving checkpoint (``python -m serve export``), weights memory-mapped.

        ``offload=serve.OffloadConfig(...)``: routed experts stay in host memory or on disk,
        with a few device slots per MoE layer (``serve.offload``).
        """
        if offload is not None:
            from serve.offload.engine import load_offloaded
            return load_offloaded(cls, directory, offload, **kwargs)
        directory = Path(directory)
        cfg, manifest, rest, experts = read_checkpoint(directory)
        build = lambda: Transformer(cfg, rngs=nnx.Rngs(0))  # noqa: E731
        if manifest.get("quantize") == "int8":
            build = lambda: quantize_experts(Transformer(cfg, rngs=nnx.Rngs(0)))  # noqa: E731
        graphdef, state = nnx.split(nnx.eval_shape(build))
        pure = nnx.to_pure_dict(state)
        flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
        stored = {**rest, **experts}
        leaves = []
        for path, leaf in flat:
            key = key_of(path)
            if key not in stored:
                raise ExportError(f"{directory}: variable {key} is missing from the checkpoint")
            if tuple(stored[key].shape) != tuple(leaf.shape):
                raise ExportError(f"{directory}: {key} has shape {tuple(stored[key].shape)}, the config "
                                  f"implies {tuple(leaf.shape)}")
            leaves.append(jnp.asarray(stored.pop(key)))
        if stored:
            raise ExportError(f"{directory}: tensors the model does not have: {sorted(stored)[:4]}")
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
        tokenizer = load_tokenizer(manifest["tokenizer"], directory)
        engine = cls(nnx.merge(graphdef, state), tokenizer, **kwargs)
        engine.source = str(directory)
        return engine

    def _build(self) -> None:
        """Split the model and (re)make the jitted step and the per-slot state."""
        graphdef, self._model_state = nnx.split(self.model)
        make_step = getattr(self.runner, "make_step", None)   # a runner that steps from Python
        self._step_fn = (make_step(graphdef) if make_step is not None
                         else runner_lib.compile_step(graphdef, self.runner))
        self._runner_state = self.runner.init_state(self.model)

    def warmup(self) -> None:
        """Compile the step for every (row bucket, width bucket) now (idle rows: no state changes);
        a runner that steps from Python (``serve.offload``) compiles its pieces too. The shapes
        compile side by side (``runner.precompile``); the idle steps then find them compiled."""
        shapes = self.step_shapes()
        runner_lib.precompile(self._step_fn, (self._idle_step_args(b, width) for b, width in shapes))
        for b, width in shapes:
            next_B, self._runner_state = self._step_fn(*self._idle_step_args(b, width))
            jax.block_until_ready(next_B)
        runner_warmup = getattr(self.runner, "warmup", None)
        if runner_warmup is not None:     # after the idle steps: it forgets what they did
            runner_warmup(self.scheduler.buckets)

    def step_shapes(self) -> list[tuple[int, int]]:
        """(rows, width) of every step the engine may run: one compile each."""
        return list(itertools.product(self.scheduler.row_buckets, self.scheduler.buckets))

    def _idle_step_args(self, rows: int, width: int) -> tuple:
        """Step arguments for ``rows`` idle rows of ``width`` tokens (nothing changes)."""
        zeros_B = np.zeros((rows,), np.int32)
        return (self._model_state, self._runner_state, np.zeros((rows, width), np.int32), zeros_B,
                np.zeros((rows,), bool), np.zeros((rows,), np.float32), np.ones((rows,), np.float32),
                zeros_B, np.zeros((rows, 2), np.uint32), zeros_B)

    def moe_layers(self) -> list[tuple[int, nnx.Module]]:
        """(layer index, MoE module) of every layer with routed experts, the MoE beside a memory
        ('engram+moe', 'pkm+moe') included (unrolled layers: serving configs are)."""
        from serve.offload.offloaded import moe_of
        if not hasattr(self.model, "layers"):
            raise ValueError("moe_layers: the model's layers are scanned (stacked); serve an "
                             "exported checkpoint (python -m serve export unrolls them)")
        return [(i, m[0]) for i, b in enumerate(self.model.layers) if (m := moe_of(b.ffn)) is not None]

    def replace_experts(self, layer: int, experts: nnx.Module) -> None:
        """Swap the experts object of MoE layer ``layer`` (idle engine only; recompiles)."""
        with self._lock:
            if self.scheduler.has_work():
                raise RuntimeError("replace_experts needs an idle engine")
            moes = dict(self.moe_layers())
            if layer not in moes:
                raise ValueError(f"replace_experts: layer {layer!r} is not an MoE layer (those are "
                                 f"{sorted(moes)})")
            moes[layer].experts = experts     # the MoE itself: beside a memory it is ffn.ffn
            self._build()

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: str | Sequence[int], params: SamplingParams,
                     on_update: Callable[[Request], None] | None = None) -> Request:
        """Tokenize and check a prompt: non-empty, ids in the vocabulary, room for the output.

        A prompt is text (encoded with the tokenizer's special tokens, e.g. a BOS) or a
        sequence of token ids (ints, or a numpy / JAX integer array) taken as they are.
        """
        if isinstance(prompt, str):
            tokens = self.tokenizer.encode(checked_text(prompt, "prompt"))
        else:
            try:
                tokens = [_token_id(t) for t in (np.asarray(prompt) if hasattr(prompt, "__array__") else prompt)]
            except TypeError:
                raise RequestError(f"prompt: must be text or a sequence of integer token ids, got "
                                   f"{str(prompt)[:80]}") from None
        if not tokens:
            raise RequestError("prompt: is empty (no tokens)")
        bad = [t for t in tokens if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]!r} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(tokens) + params.max_new_tokens > self.max_len:
            raise RequestError(f"prompt: {len(tokens)} prompt tokens + {params.max_new_tokens} new tokens "
                               f"exceed the context limit of {self.max_len} tokens")
        return Request(tokens, params, on_update)

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe); raises QueueFull or EngineStopped."""
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self.scheduler.submit(request)
            self.metrics.submitted(len(request.prompt))
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        with self._lock:
            if not request.done:
                self._finish(request, "cancelled")

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop: str | Sequence[str] | None = None) -> list[Output]:
        """Generate for every prompt (same parameters); one Output per prompt, in order.

        ``prompts`` is a list of prompts; a lone string is one prompt (not one per character).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=tuple([stop] if isinstance(stop, str) else stop or ()))
        requests = [self.make_request(p, params) for p in prompts]
        try:
            self._run_to_completion(requests)
        except BaseException:   # a failed step or Ctrl-C: leave no request queued or in a slot
            with self._lock:
                for request in requests:
                    if not request.done:
                        self._finish(request, "cancelled")
                    self.scheduler.release(request)
            raise
        return [self.output(r) for r in requests]

    def _run_to_completion(self, requests: list[Request]) -> None:
        pending = collections.deque(requests)
        while pending:                     # as many as the queue takes; the rest as it drains
            try:
                self.submit(pending[0])
                pending.popleft()
            except QueueFull:
                if self.running:
                    time.sleep(0.005)
                else:
                    self._step_or_fail()
        if self.running:
            for request in requests:
                request.finished.wait()
        else:
            while not all(r.done for r in requests):
                self._step_or_fail()

    def output(self, request: Request) -> Output:
        first = None if request.first_token_at is None else request.first_token_at - request.submitted_at
        end = request.finished_at or time.perf_counter()
        return Output(list(request.generated), request.text, request.finish_reason or "", len(request.prompt),
                      first, end - request.submitted_at)

    # ------------------------------------------------------------------ stepping
    def step(self) -> bool:
        """Run one batch step; False when there was nothing to do."""
        with self._lock:
            plan = self.scheduler.plan()
        if plan is None:
            return False
        start = time.perf_counter()
        next_B, self._runner_state = self._step_fn(
            self._model_state, self._runner_state, plan.tokens_BS, plan.lengths_B, plan.reset_B,
            plan.temperature_B, plan.top_p_B, plan.top_k_B, plan.seed_B2, plan.index_B)
        next_B = np.asarray(next_B)
        with self._lock:
            updated = self.scheduler.commit(plan, next_B)
            for request in updated:
                self._check_finished(request)
            for request in plan.rows:
                if request is not None and request.done:
                    self.scheduler.release(request)
            self.metrics.step(plan, len(updated), time.perf_counter() - start)
        for request in updated:
            self._notify(request)
        for hook in self.step_hooks:
            hook(self, plan)
        return True

    def _check_finished(self, request: Request) -> None:
        params = request.params
        if request.generated[-1] in self.tokenizer.eos_token_ids:
            request.generated.pop()
            self._finish(request, "stop")
            return
        if params.stop:
            text = self.tokenizer.decode(request.generated)
            cuts = [text.find(s) for s in params.stop if s in text]
            if cuts:
                self._finish(request, "stop", text[:min(cuts)])
                return
        if len(request.generated) >= params.max_new_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, text: str | None = None) -> None:
        request.text = self.tokenizer.decode(request.generated) if text is None else text
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        self.metrics.finished(request)
        if request.slot is None:
            self.scheduler.release(request)   # still waiting: leave the queue
        request.finished.set()
        # 'stop' / 'length' arrive with the step's token update; these end without one
        if reason in ("cancelled", "error"):
            self._notify(request)

    def _notify(self, request: Request) -> None:
        """Call ``request.on_update``. One that raises (its listener is gone: a closed event
        loop) cancels its own request and is not called again; the batch and the loop go on."""
        if request.on_update is None:
            return
        try:
            request.on_update(request)
        except Exception as err:
            self.metrics.error(err)
            request.on_update = None
            with self._lock:
                if not request.done:
                    self._finish(request, "cancelled")
                self.scheduler.release(request)

    # ------------------------------------------------------------------ background loop
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run the step loop in a background thread (the HTTP server's engine)."""
        if not self.running:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with ``drain`` finish the queued and running ones first."""
        with self._lock:
            self._stopping = True
            if not drain:
                for request in [*self.scheduler.waiting, *[r for r in self.scheduler.slots if r]]:
                    self._finish(request, "cancelled")
                    self.scheduler.release(request)
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.scheduler.has_work() and not self._stopping:
                    self._lock.wait()
                if not self.scheduler.has_work():
                    return
            try:
                self._step_or_fail()
            except Exception:  # a failed step fails its requests (above), not the server
                _log.exception("engine step failed: its requests end with finish_reason 'error'")

    def _step_or_fail(self) -> bool:
        """``step()``; one that raises (also on Ctrl-C) ends the requests in the slots with
        'error' and rebuilds the per-slot state (the step may have consumed it), then re-raises."""
        try:
            return self.step()
        except BaseException as err:
            self.metrics.error(err)
            with self._lock:
                for request in [r for r in self.scheduler.slots if r]:
                    self._finish(request, "error")
                    self.scheduler.release(request)
            self._build()
            raise

    def stats(self) -> dict:
        with self._lock:
            out = self.metrics.snapshot(queue=len(self.scheduler.waiting), active=self.scheduler.active)
        for name, fn in self.extra_stats.items():
            out[name] = fn()
        return out
