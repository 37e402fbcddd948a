"""The end-of-run summary (printed, and written to OUT/summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.metrics import format_duration


def summarize(records: list[dict], step: int, wall_s: float, train_s: float, trained_steps: int,
              tokens_per_step: int) -> dict:
    """``train_s``: the part of ``wall_s`` spent in training steps (tokens/s is over it)."""
    evals = [r for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r and r.get("step", 0) > 0]
    loads = [r["expert_load"] for r in train if np.size(r.get("expert_load", [])) > 0]
    summary = {"step": step, "trained_steps": trained_steps, "wall_time_s": round(wall_s, 2),
               "tokens_per_s": (round((trained_steps - 1) * tokens_per_step / train_s, 1)
                               if train_s > 0 and trained_steps > 1 else None)}
    if evals:
        for key in ("val_loss", "val_bpb"):
            if key in evals[-1]:
                summary[f"initial_{key}"] = evals[0][key]
                summary[f"final_{key}"] = evals[-1][key]
        summary["first_eval_step"], summary["last_eval_step"] = evals[0]["step"], evals[-1]["step"]
    if train:
        summary["final_train_loss"] = train[-1]["loss"]
    if loads:
        load_LE = np.asarray(loads[-1])
        summary["expert_load_max_over_mean"] = float(load_LE.max() / load_LE.mean())
        summary["expert_load_min_over_mean"] = float(load_LE.min() / load_LE.mean())
        summary["dropped_fraction"] = train[-1].get("dropped_fraction", 0.0)
    return summary


def write_summary(path: Path, summary: dict) -> None:
    """Write summary.json, except over the summary of the run that reached this step when
    this one trained nothing (the same command run again after the end): its time and
    tokens/s would be replaced by 0s and null."""
    if summary["trained_steps"] == 0 and path.is_file():
        try:
            if json.loads(path.read_text()).get("step") == summary["step"]:
                return
        except (OSError, ValueError, AttributeError):
            pass  # unreadable: replace it
    path.write_text(json.dumps(summary, indent=2))


def print_summary(summary: dict, out: Path, plot: Path | None, checkpoint_steps: list[int],
                  tensorboard: bool) -> None:
    lines = ["", "== summary =="]
    rate = summary["tokens_per_s"]
    lines.append(f"steps        {summary['step']} ({summary['trained_steps']} this run, "
                 f"{format_duration(summary['wall_time_s'])}"
                 f"{f', {rate:,.0f} tokens/s' if rate else ''})")
    if "final_val_loss" in summary:
        text = (f"val loss     {summary['initial_val_loss']:.4f} -> {summary['final_val_loss']:.4f} "
                f"nats/token (steps {summary['first_eval_step']} -> {summary['last_eval_step']})")
        if "final_val_bpb" in summary:
            text += (f"; {summary['initial_val_bpb']:.3f} -> {summary['final_val_bpb']:.3f} "
                     f"bits/byte")
        lines.append(text)
    if "expert_load_max_over_mean" in summary:
        lines.append(f"expert load  max/mean {summary['expert_load_max_over_mean']:.2f}, "
                     f"min/mean {summary['expert_load_min_over_mean']:.2f}, "
                     f"dropped {summary['dropped_fraction']:.1%}")
    steps = ", ".join(map(str, sorted(checkpoint_steps))) or "none"
    lines.append(f"written      {out}/ : model (config.json + model/), checkpoints/ (steps {steps}), "
                 f"metrics.jsonl, {'tb/, ' if tensorboard else ''}{plot.name + ', ' if plot else ''}summary.json")
    print("\n".join(lines), flush=True)
