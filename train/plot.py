"""The end-of-run figure: loss curves and the expert-load heatmap (layer x expert)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOT_NAME = "training.png"


def plot_run(records: list[dict], path: Path, title: str) -> Path | None:
    """Write the PNG; returns None when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install 'moejax[train]')")
        return None
    train = [r for r in records if "loss" in r]
    if not train:
        return None
    evals = [r for r in records if "val_loss" in r]
    loads = [r["expert_load"] for r in train if np.size(r.get("expert_load", [])) > 0]

    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5),
                                           gridspec_kw={"width_ratios": [3, 2]})
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                     label="validation loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    if loads:
        load_LE = np.asarray(loads[-1])
        image = ax_load.imshow(load_LE, aspect="auto", cmap="viridis")
        ax_load.set(xlabel="expert", ylabel="MoE layer",
                    title=f"expert load at step {train[-1]['step']} (uniform = {1 / load_LE.shape[1]:.3f})")
        ax_load.set_xticks(range(load_LE.shape[1]))
        ax_load.set_yticks(range(load_LE.shape[0]))
        fig.colorbar(image, ax=ax_load, label="fraction of routed assignments")
    else:
        ax_load.axis("off")
        ax_load.text(0.5, 0.5, "dense model: no experts", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
