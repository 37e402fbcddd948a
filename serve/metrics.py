"""Engine counters and their Prometheus text form (``GET /metrics``)."""

from __future__ import annotations

import collections
import time

RATE_WINDOW_S = 10.0


class EngineMetrics:
    """Counts requests, tokens and steps; tokens/s over the last ``RATE_WINDOW_S`` seconds."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.requests_submitted = 0
        self.requests_finished: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.occupied_slot_steps = 0
        self.errors = 0
        self.last_error = ""
        self.ttft_sum, self.ttft_count = 0.0, 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def submitted(self, prompt_tokens: int) -> None:
        self.requests_submitted += 1
        self.prompt_tokens += prompt_tokens

    def step(self, plan, new_tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self.steps += 1
        self.step_seconds += seconds
        self.occupied_slot_steps += sum(r is not None for r in plan.rows)
        self.generated_tokens += new_tokens
        self._recent.append((now, new_tokens))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def finished(self, request) -> None:
        self.requests_finished[request.finish_reason] += 1
        if request.first_token_at is not None:
            self.ttft_sum += request.first_token_at - request.submitted_at
            self.ttft_count += 1

    def error(self, err: Exception) -> None:
        self.errors += 1
        self.last_error = f"{type(err).__name__}: {err}"[:200]

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [n for t, n in self._recent if t >= now - RATE_WINDOW_S]
        return sum(recent) / RATE_WINDOW_S

    def snapshot(self, *, queue: int, active: int) -> dict:
        return {
            "requests_submitted": self.requests_submitted,
            "requests_finished": dict(self.requests_finished),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "steps": self.steps,
            "step_seconds": self.step_seconds,
            "tokens_per_second": self.tokens_per_second(),
            "queue_length": queue,
            "active_slots": active,
            "num_slots": self.num_slots,
            "batch_occupancy": active / self.num_slots,
            "mean_batch_occupancy": self.occupied_slot_steps / max(1, self.steps) / self.num_slots,
            "mean_time_to_first_token": self.ttft_sum / max(1, self.ttft_count),
            "errors": self.errors,
        }


def prometheus_text(stats: dict, http_counts: dict[str, int]) -> str:
    """The engine snapshot (+ HTTP response counts by status) in Prometheus exposition format."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP moejax_{name} {help_}")
        lines.append(f"# TYPE moejax_{name} {kind}")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"moejax_{name}{label} {float(value):.6g}")

    metric("requests_submitted_total", "counter", "Requests accepted into the queue.",
           [({}, stats["requests_submitted"])])
    metric("requests_finished_total", "counter", "Requests finished, by reason.",
           [({"reason": r}, n) for r, n in sorted(stats["requests_finished"].items())] or [({"reason": "stop"}, 0)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [({}, stats["generated_tokens"])])
    metric("steps_total", "counter", "Engine batch steps.", [({}, stats["steps"])])
    metric("tokens_per_second", "gauge", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
           [({}, stats["tokens_per_second"])])
    metric("queue_length", "gauge", "Requests waiting for a batch slot.", [({}, stats["queue_length"])])
    metric("batch_occupancy", "gauge", "Fraction of batch slots in use now.", [({}, stats["batch_occupancy"])])
    metric("mean_batch_occupancy", "gauge", "Mean fraction of slots in use per step.",
           [({}, stats["mean_batch_occupancy"])])
    metric("time_to_first_token_seconds_mean", "gauge", "Mean time to first token.",
           [({}, stats["mean_time_to_first_token"])])
    metric("engine_errors_total", "counter", "Failed engine steps.", [({}, stats["errors"])])
    metric("http_responses_total", "counter", "HTTP responses by status code.",
           [({"code": c}, n) for c, n in sorted(http_counts.items())] or [({"code": "200"}, 0)])
    for group, values in stats.items():          # figures of plug-ins (e.g. the expert store)
        if isinstance(values, dict) and group not in ("requests_finished",):
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    metric(f"{group}_{key}", "gauge", f"{group} {key}.", [({}, value)])
    return "\n".join(lines) + "\n"
