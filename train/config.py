"""TrainConfig: every knob of a training run, validated at construction.

The config is frozen and JSON-serialisable (it is written to
``OUT/train_config.json``). Errors the user can fix are ``TrainError``: the
command line prints them as one line and exits non-zero, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from moejax.config import REMATS, ConfigError, ModelConfig
from moejax.mesh_spec import parse_mesh_spec

DEFAULT_PRESET = "tiny"
COMPUTE_DTYPES = ("float32", "bfloat16")
MAX_SEED = 2**32 - 1


class TrainError(Exception):
    """Bad input or an unrecoverable run condition, explained in one line."""

    exit_code = 2


class NonFiniteError(TrainError):
    """The loss or the gradients stopped being finite."""

    exit_code = 3


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``preset=None`` means: the model in ``out`` if there is
    one, else ``tiny``. ``model_overrides`` are ``FIELD=VALUE`` strings
    (``moe.FIELD=VALUE`` for the MoE block) applied to the preset."""

    out: str = "runs/default"
    preset: str | None = None
    model_overrides: tuple[str, ...] = ()
    data: str | None = None
    tokenizer: str | None = None
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0
    param_groups: tuple[str, ...] = ()
    memory_lr_mult: float = 10.0   # memory-layer value tables: lr * this, no weight decay
    dtype: str | None = None       # compute dtype; None = the model config's
    remat: str | None = None       # 'none' | 'full' | 'dots'; None = the model config's
    mesh: str | None = None
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 200
    keep: int = 3
    async_checkpoint: bool = True
    seed: int = 0
    resume: bool = False
    force: bool = False
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches",
                     "log_every", "checkpoint_every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise TrainError(f"--warmup-steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.seed <= MAX_SEED:  # a jax PRNG key holds 32 bits of it (larger ones alias)
            raise TrainError(f"--seed must be in [0, {MAX_SEED}], got {self.seed!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "clip_norm"):
            if not math.isfinite(getattr(self, name)):
                raise TrainError(f"--{_flag(name)} must be a finite number, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr!r}")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.memory_lr_mult >= 0:
            raise TrainError(f"--memory-lr-mult must be >= 0, got {self.memory_lr_mult!r}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise TrainError("--weight-decay and --clip-norm must be >= 0 (0 turns them off)")
        if self.dtype is not None and self.dtype not in COMPUTE_DTYPES:
            raise TrainError(f"--dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.remat is not None and self.remat not in REMATS:
            raise TrainError(f"--remat must be one of {REMATS}, got {self.remat!r}")
        if self.preset is not None and self.preset not in ModelConfig.preset_names():
            raise TrainError(f"unknown preset {self.preset!r}; available: "
                             f"{', '.join(ModelConfig.preset_names())}")
        if not self.out:
            raise TrainError("--out must name a directory")
        requested_model(self)  # --preset/--set errors now, before any data is read
        parse_param_groups(self.param_groups)  # their syntax; what they match needs the model
        if self.mesh is not None:  # its syntax and axis names; the device count needs jax
            try:
                parse_mesh_spec(self.mesh)
            except ValueError as err:
                raise TrainError(f"--mesh: {err}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def parse_param_groups(rules: tuple[str, ...]) -> list[tuple[re.Pattern, float]]:
    """``--param-group`` rules -> (pattern, lr multiplier); see ``train.optim``."""
    groups = []
    for rule in rules:
        pattern, eq, mult = rule.rpartition("=")
        try:
            groups.append((re.compile(pattern), float(mult)))
            ok = bool(eq and pattern) and 0 <= float(mult) < math.inf   # inf: NaN updates
            why = ""
        except re.error as err:
            ok, why = False, f" ({pattern!r} is not a regular expression: {err})"
        except ValueError:
            ok, why = False, ""
        if not ok:
            raise TrainError(f"--param-group {rule!r}: expected REGEX=LR_MULT with a finite "
                             f"LR_MULT >= 0, e.g. 'layers/0/.*=0.5'{why}")
    return groups


def _flag(field_name: str) -> str:
    return field_name.replace("_", "-")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as router=sigmoid


def apply_overrides(cfg: ModelConfig, overrides: tuple[str, ...]) -> ModelConfig:
    """``('n_layers=2', 'moe.num_experts=4', 'memory.top_k=16')`` -> a new ModelConfig (validated)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"moe": {}, "memory": {}}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TrainError(f"--set {item!r}: expected FIELD=VALUE, e.g. n_layers=2 or moe.top_k=1")
        section, dot, field = key.strip().partition(".")
        target, field = (nested[section], field) if dot and section in nested else (top, key.strip())
        value = _parse_value(value.strip())
        target[field] = tuple(value) if isinstance(value, list) else value  # JSON lists -> tuples
    known = {f.name for f in dataclasses.fields(ModelConfig)} - set(nested)
    unknown = [k for k in top if k not in known]
    if unknown:
        raise TrainError(f"--set: unknown model field(s) {unknown}; allowed: {sorted(known)} "
                         f"and moe.FIELD, memory.FIELD")
    if cfg.moe is not None:  # the MoE block follows the model's width and compute dtype
        for name in ("d_model", "dtype"):
            if name in top:
                nested["moe"].setdefault(name, top[name])
    try:
        for section, changes in nested.items():
            if not changes:
                continue
            current = getattr(cfg, section)
            if current is None:
                raise TrainError(f"--set {section}.*: model {cfg.name!r} has no {section} config")
            section_known = {f.name for f in dataclasses.fields(type(current))}
            bad = [k for k in changes if k not in section_known]
            if bad:
                raise TrainError(f"--set: unknown {section} field(s) {bad}; allowed: {sorted(section_known)}")
            top[section] = current.replace(**changes)
        return cfg.replace(**top) if top else cfg
    except (ConfigError, TypeError) as err:
        raise TrainError(f"--set: {err}") from None


def override_keys(overrides: tuple[str, ...]) -> set[str]:
    """The fields ``--set`` names: ``('dtype=bfloat16', 'moe.top_k=1')`` -> {'dtype', 'moe.top_k'}."""
    return {item.partition("=")[0].strip() for item in overrides}


def training_preset(name: str) -> ModelConfig:
    """A preset as training builds it: layers scanned (compile time flat in depth);
    ``--set scan_layers=false`` unrolls them."""
    return ModelConfig.preset(name).replace(scan_layers=True)


def requested_model(cfg: TrainConfig) -> ModelConfig | None:
    """The model the flags ask for, or None when they ask for none in particular."""
    if cfg.preset is None and not cfg.model_overrides:
        return None
    base = training_preset(cfg.preset or DEFAULT_PRESET)
    return apply_overrides(base, cfg.model_overrides)
