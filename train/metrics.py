"""Metrics: a JSON-lines log, TensorBoard event files, and the console progress.

``OUT/metrics.jsonl`` holds one record per logged step (at least ``step`` and
``loss``); evaluation records carry ``val_loss`` (and ``val_bpb``). On resume,
records past the checkpoint's step are dropped so the log reads as one run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

LOG_NAME = "metrics.jsonl"


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
    return records


def truncate_records(path: Path, last_step: int) -> None:
    """Keep only records up to ``last_step`` (the step a resumed run restarts from)."""
    kept = [r for r in read_records(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


class MetricsLog:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool, is_primary: bool = True):
        self.path = out / LOG_NAME
        self.enabled = is_primary
        self.tb = None
        if not is_primary:
            return
        if start_step > 0:
            truncate_records(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("note: tensorboardX is not installed; no TensorBoard events "
                      "(pip install 'moejax[train]')")
            else:
                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step or None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "expert_load":
                for layer, row in enumerate(value):
                    for expert, load in enumerate(row):
                        self.tb.add_scalar(f"expert_load/layer{layer}/expert{expert}", load, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                group = "val" if key.startswith("val_") else "train"
                self.tb.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Console progress: a live bar on a terminal, one line per log step otherwise."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total, self.start = total_steps, start_step
        self.enabled = enabled
        self.live = enabled and sys.stdout.isatty()
        self.t0 = time.perf_counter()

    def eta(self, step: int, step_time: float) -> str:
        return format_duration((self.total - step) * step_time)

    def bar(self, step: int, loss: float, tokens_per_s: float | None, step_time: float) -> None:
        if not self.enabled:
            return
        frac = step / self.total
        filled = int(frac * 24)
        text = (f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * filled}{'.' * (24 - filled)}] "
                f"{frac:4.0%} | loss {loss:.3f} | "
                f"{'--' if tokens_per_s is None else f'{tokens_per_s:,.0f}'} tok/s | "
                f"ETA {self.eta(step, step_time)}")
        if self.live:
            sys.stdout.write("\r" + text.ljust(100))
            sys.stdout.flush()
        else:
            print(text, flush=True)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            sys.stdout.write("\r" + " " * 100 + "\r")
        print(text, flush=True)
