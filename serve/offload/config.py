"""``serve.OffloadConfig``: how the engine keeps routed experts off the device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moejax.validate import as_int
from serve.offload.policies import POLICIES
from serve.offload.trace import RoutingTrace, budgets_from_trace, expert_frequency_LE

STORES = ("host", "disk")
BUDGETS = ("uniform", "trace")


class OffloadConfigError(ValueError):
    """An OffloadConfig field holds a value that is not allowed."""


def _need(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise OffloadConfigError(f"OffloadConfig.{field}: {message}")


@dataclass(frozen=True)
class OffloadConfig:
    """Experts in host memory or on disk, S device slots per MoE layer.

    - ``slots_per_layer``: device slots per MoE layer (1..num_experts); with
      ``budgets="trace"`` the same total is split over layers by the trace.
    - ``policy``: 'lru' | 'lfu' | 'lfru' | 'static' (static needs ``trace``).
    - ``prefetch``: predict the next MoE layer's experts and copy them early.
    - ``store``: 'host' (pinned host memory) or 'disk' (read from the
      checkpoint's experts file at each copy); ``path``: the checkpoint
      directory the disk store reads (default: the one the engine loads).
    - ``trace``: a recorded routing trace (``.npz`` from ``trace-sim``, or a
      RoutingTrace) for 'static' pinning and ``budgets="trace"``.
    """

    slots_per_layer: int = 4
    policy: str = "lfru"
    prefetch: bool = True
    store: str = "host"
    budgets: str = "uniform"
    trace: str | Path | RoutingTrace | None = None
    path: str | Path | None = None
    lfru_decay: float = 0.75

    def __post_init__(self):
        s = as_int(self.slots_per_layer)     # numpy / JAX integer scalars count as ints
        _need(s is not None and s >= 1, "slots_per_layer",
              f"must be an int >= 1 (device slots per MoE layer), got {self.slots_per_layer!r}")
        object.__setattr__(self, "slots_per_layer", s)
        _need(isinstance(self.policy, str) and self.policy in POLICIES, "policy", f"must be one of {tuple(POLICIES)}, got {self.policy!r}")
        _need(isinstance(self.prefetch, bool), "prefetch", f"must be True or False, got {self.prefetch!r}")
        _need(self.store in STORES, "store", f"must be one of {STORES}, got {self.store!r}")
        _need(self.budgets in BUDGETS, "budgets", f"must be one of {BUDGETS}, got {self.budgets!r}")
        decay = self.lfru_decay
        _need(isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 < decay < 1.0,
              "lfru_decay", f"must be a number in (0, 1), got {decay!r}")
        _need(self.trace is None or isinstance(self.trace, (str, Path, RoutingTrace)), "trace",
              f"must be a path to a trace .npz or a RoutingTrace, got {type(self.trace).__name__}")
        needs_trace = self.policy == "static" or self.budgets == "trace"
        _need(self.trace is not None or not needs_trace, "trace",
              "policy 'static' and budgets 'trace' need a recorded routing trace "
              "(python -m serve trace-sim --out DIR writes DIR/trace.npz)")
        if isinstance(self.trace, (str, Path)):
            _need(Path(self.trace).is_file(), "trace", f"no trace file at {self.trace}")
        if self.path is not None:
            _need(Path(self.path).is_dir(), "path", f"{self.path} is not a directory")

    def load_trace(self) -> RoutingTrace | None:
        if self.trace is None or isinstance(self.trace, RoutingTrace):
            return self.trace
        return RoutingTrace.load(self.trace)

    def resolve(self, num_layers: int, num_experts: int):
        """(slots per MoE layer, expert frequencies [L, E] or None), checked against the model."""
        _need(self.slots_per_layer <= num_experts, "slots_per_layer",
              f"{self.slots_per_layer} slots but the model has only {num_experts} experts per layer")
        trace = self.load_trace()
        if trace is not None:
            _need(trace.need_NLE.shape[1:] == (num_layers, num_experts), "trace",
                  f"recorded for {trace.need_NLE.shape[1]} MoE layers x {trace.num_experts} experts, "
                  f"the model has {num_layers} x {num_experts}")
        if self.budgets == "trace":
            slots_L = budgets_from_trace(trace, self.slots_per_layer * num_layers)
        else:
            slots_L = [self.slots_per_layer] * num_layers
        return slots_L, (None if trace is None else expert_frequency_LE(trace))
