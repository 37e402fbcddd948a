"""Where a run starts, and its checkpoints.

``OUT`` is a model directory (``config.json`` + ``model/``, as written by
``moejax.checkpoint.save_model`` and by ``moejax.convert``) plus the run's
files::

    OUT/config.json, OUT/model/   the model (final weights once the run ends)
    OUT/checkpoints/<step>/        train states: params, optimizer, router biases, meta
    OUT/train_config.json          the flags of the latest invocation
    OUT/metrics.jsonl, OUT/tb/, OUT/training.png

Start rules: a checkpoint in OUT -> resume it exactly (step, optimizer, data
order); else a model in OUT -> start from its weights with a fresh optimizer
at step 0; else a fresh model (``--resume`` then is an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moejax import checkpoint as mckpt
from moejax.config import ModelConfig, config_to_dict
from train.config import (DEFAULT_PRESET, TrainConfig, TrainError, requested_model, training_preset,
                          with_compute_dtype)

CHECKPOINT_DIR = "checkpoints"
# compute choices may change between runs; scan_layers is the saved model's layout
IGNORED_FIELDS = ("dtype", "moe.dtype", "remat", "scan_layers")


@dataclass(frozen=True)
class StartPoint:
    kind: str                  # 'fresh' | 'checkpoint' | 'model'
    model_cfg: ModelConfig
    step: int = 0              # checkpoint step to restore (kind == 'checkpoint')


def _flatten(cfg: ModelConfig) -> dict:
    flat = {}
    for key, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_differences(saved: ModelConfig, asked: ModelConfig) -> list[str]:
    a, b = _flatten(saved), _flatten(asked)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in IGNORED_FIELDS and k != "name"]
    return [f"{k}: {a.get(k)!r} saved vs {b.get(k)!r} asked" for k in keys if a.get(k) != b.get(k)]


def latest_checkpoint(out: Path) -> int | None:
    directory = out / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    # orbax saves into a temporary name and renames to "<step>" once complete
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def start_kind(cfg: TrainConfig) -> tuple[str, int | None]:
    """('checkpoint' | 'model' | 'fresh', latest checkpoint step); checks --resume early."""
    out = Path(cfg.out)
    step = latest_checkpoint(out)
    has_model = (out / "config.json").is_file() and (out / "model").is_dir()
    kind = "checkpoint" if step is not None else "model" if has_model else "fresh"
    if kind == "fresh" and cfg.resume:
        raise TrainError(f"--resume: {out} holds neither a checkpoint ({CHECKPOINT_DIR}/) nor a "
                         f"model (config.json + model/)")
    return kind, step


def plan_start(cfg: TrainConfig, data_vocab: int) -> StartPoint:
    """Decide fresh / resume / start-from-model and the model config (see module doc)."""
    out = Path(cfg.out)
    kind, step = start_kind(cfg)
    asked = requested_model(cfg)
    if kind == "fresh":
        model_cfg = asked or _saved_config(out) or training_preset(DEFAULT_PRESET)
        if data_vocab > model_cfg.vocab_size and not _sets(cfg, "vocab_size"):
            model_cfg = model_cfg.replace(vocab_size=data_vocab)  # e.g. a tokenizer's vocabulary
    else:
        try:
            model_cfg = mckpt.load_config(out)
        except (OSError, ValueError, TypeError) as err:
            raise TrainError(f"{out}/config.json cannot be read: {err}") from None
        if asked is not None:
            diffs = config_differences(model_cfg, asked)
            if diffs:
                raise TrainError(f"{out} holds a {kind} of a different model shape ({diffs[0]}"
                                 f"{f'; {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                                 f"use another --out or drop --preset/--set")
    if data_vocab > model_cfg.vocab_size:
        raise TrainError(f"the data has token ids up to {data_vocab - 1} but the model's "
                         f"vocab_size is {model_cfg.vocab_size}; pass --set vocab_size={data_vocab}")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_cfg.max_seq_len}; pass --set max_seq_len={cfg.seq_len} or a shorter --seq-len")
    if cfg.dtype is not None:
        model_cfg = with_compute_dtype(model_cfg, cfg.dtype)
    if cfg.remat is not None:
        model_cfg = model_cfg.replace(remat=cfg.remat)
    return StartPoint(kind, model_cfg, step or 0)


def _saved_config(out: Path) -> ModelConfig | None:
    """config.json left by a run killed before its first checkpoint."""
    try:
        return mckpt.load_config(out) if (out / "config.json").is_file() else None
    except (OSError, ValueError, TypeError):
        return None


def _sets(cfg: TrainConfig, field: str) -> bool:
    return any(o.split("=", 1)[0].strip() == field for o in cfg.model_overrides)


class Checkpoints:
    """Async, atomic train-state checkpoints under ``OUT/checkpoints`` (last ``keep`` kept)."""

    def __init__(self, out: Path, keep: int, async_save: bool):
        self.directory = out / CHECKPOINT_DIR
        self.manager = mckpt.train_state_manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state: dict, meta: dict) -> None:
        mckpt.save_train_state(self.manager, step, state, meta)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        try:
            return mckpt.restore_train_state(self.manager, step, abstract_state)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            self.close()
            raise TrainError(f"checkpoint {self.directory / str(step)} does not match the model "
                             f"built from config.json ({_first_line(err)})") from None

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_model_dir(out: Path, abstract_state: dict) -> dict:
    try:
        return mckpt.restore_model_variables(out, abstract_state)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        raise TrainError(f"the model in {out}/model does not match its config.json "
                         f"({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__

