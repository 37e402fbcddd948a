"""Where a run starts, decided before anything heavy is imported.

``OUT`` is a model directory (``config.json`` + ``model/``, as written by
``moejax.checkpoint.save_model`` and by ``moejax.convert``) plus the run's
files::

    OUT/config.json, OUT/model/   the model (final weights once the run ends)
    OUT/checkpoints/<step>/        train states: params, optimizer, router biases, meta
    OUT/train_config.json          the flags of the latest invocation
    OUT/metrics.jsonl, OUT/tb/, OUT/training.png, OUT/summary.json

Start rules: a checkpoint in OUT -> resume it exactly (step, optimizer, data
order); else a model in OUT -> start from its weights with a fresh optimizer
at step 0; else a fresh model (``--resume`` then is an error). Text for a
model in OUT is read with that model's tokenizer (:func:`run_tokenizer`)
unless ``--tokenizer`` names one.

Everything here is plain Python and numpy (no jax, no orbax): :func:`preflight`
checks the run directory, reads the data and plans the start, so bad input is
reported in a fraction of a second and before anything is written. Nothing on
disk is replaced unless it belongs to this run: a non-empty ``--out`` that holds
no moejax run needs ``--force``, and a run of another model shape is an error
that names the flag to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moejax.config import ConfigError, ModelConfig, config_to_dict, read_config_file
from moejax.validate import check_writable_dir
from train.config import (DEFAULT_PRESET, TrainConfig, TrainError, override_keys, requested_model,
                          training_preset)

CHECKPOINT_DIR = "checkpoints"
# compute choices may change between runs (a --set of one applies to the saved model);
# scan_layers is the saved model's layout (a --set that changes it is refused)
IGNORED_FIELDS = ("dtype", "moe.dtype", "remat", "scan_layers")
# What a run writes into OUT (and convert's tokenizer/): a directory holding only
# these is a run, not someone else's files.
RUN_FILES = frozenset({"config.json", "model", CHECKPOINT_DIR, "train_config.json", "metrics.jsonl",
                       "metrics.tmp", "tb", "training.png", "summary.json", "tokenizer",
                       "config.json.tmp", "train_config.json.tmp"})
RUN_DIRS = frozenset({"model", CHECKPOINT_DIR, "tb", "tokenizer"})


@dataclass(frozen=True)
class StartPoint:
    kind: str                  # 'fresh' | 'checkpoint' | 'model'
    model_cfg: ModelConfig
    step: int = 0              # newest checkpoint step (kind == 'checkpoint')


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
    # orbax saves into a temporary name and renames to "<step>" once complete;
    # "<step>.damaged" are checkpoints set aside
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def check_out_dir(out: Path) -> None:
    """``--out`` must be (or be creatable as) a directory this process can write in."""
    try:
        check_writable_dir(out, "--out")
    except ValueError as err:
        raise TrainError(str(err)) from None


def _foreign_entries(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and
                  not p.name.startswith(".moejax-probe-"))


def _read_saved_config(out: Path, kind: str) -> ModelConfig:
    try:
        return read_config_file(out / "config.json")
    except ConfigError as err:
        fix = "use another --out" if kind != "fresh" else "pass --force to replace it, or use another --out"
        raise TrainError(f"{err}; {fix}") from None


def start_kind(cfg: TrainConfig) -> tuple[str, int | None]:
    """('checkpoint' | 'model' | 'fresh', newest checkpoint step); checks --out and --resume."""
    out = Path(cfg.out)
    check_out_dir(out)
    for name in RUN_FILES:
        path, want_dir = out / name, name in RUN_DIRS
        if path.exists() and path.is_dir() != want_dir:
            raise TrainError(f"{path} is not a {'directory' if want_dir else 'file'}; move it away "
                             f"or use another --out")
    step = latest_checkpoint(out)
    has_model = (out / "config.json").is_file() and (out / "model").is_dir()
    kind = "checkpoint" if step is not None else "model" if has_model else "fresh"
    if kind == "fresh" and cfg.resume:
        raise TrainError(f"--resume: {out} holds neither a checkpoint ({CHECKPOINT_DIR}/) nor a "
                         f"model (config.json + model/)")
    foreign = _foreign_entries(out)
    if kind == "fresh" and foreign and not cfg.force:
        raise TrainError(f"--out {str(out)!r} is not empty and holds no moejax run (e.g. "
                         f"{foreign[0]!r}); pass --force to write into it, or use a new directory")
    if step is not None and step > cfg.steps:
        raise TrainError(f"--steps {cfg.steps} is below step {step} of the run in {out}; pass "
                         f"--steps {step} or more to continue it, or another --out")
    return kind, step


def holds_run(cfg: TrainConfig, kind: str) -> bool:
    """--out holds a model to continue: a checkpoint, a model directory, or the config.json
    of a run killed before its first checkpoint (which --force replaces)."""
    return kind != "fresh" or ((Path(cfg.out) / "config.json").is_file() and not cfg.force)


def run_tokenizer(cfg: TrainConfig, kind: str) -> str | None:
    """The tokenizer.json of the model in --out, absolute: the one its last training named
    (train_config.json), else the one convert copied (tokenizer/tokenizer.json); None: bytes."""
    out = Path(cfg.out)
    if not holds_run(cfg, kind):
        return None
    previous = out / "train_config.json"
    if previous.is_file():
        try:
            named = json.loads(previous.read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError) as err:
            raise TrainError(f"{previous} is unreadable ({type(err).__name__}); it names the run's "
                             f"tokenizer: fix or remove it, or pass --tokenizer") from None
        if named:
            if not Path(named).is_file():
                raise TrainError(f"the run in {out} was trained with tokenizer {named!r} "
                                 f"({previous.name}), which is gone; pass --tokenizer")
            return str(Path(named).absolute())
    converted = out / "tokenizer" / "tokenizer.json"
    return str(converted.absolute()) if converted.is_file() else None


def plan_start(cfg: TrainConfig, data_vocab: int) -> StartPoint:
    """Decide fresh / resume / start-from-model and the model config (see module doc)."""
    out = Path(cfg.out)
    kind, step = start_kind(cfg)
    asked = requested_model(cfg)
    saved = _read_saved_config(out, kind) if holds_run(cfg, kind) else None
    if saved is not None and asked is not None:
        diffs = config_differences(saved, asked)
        if diffs:
            what = "model" if kind == "fresh" else kind
            raise TrainError(f"{out} holds a {what} of a different model shape ({diffs[0]}"
                             f"{f'; {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                             f"use another --out, or drop --preset/--set to continue it")
    if saved is not None and asked is not None:
        saved = _with_named_compute_fields(saved, asked, cfg)
    model_cfg = saved or asked or training_preset(DEFAULT_PRESET)
    _check_vocab(cfg, model_cfg, data_vocab, saved is not None)
    if not saved and not asked and data_vocab > model_cfg.vocab_size:
        print(f"note: vocab_size {model_cfg.vocab_size} of preset {DEFAULT_PRESET!r} raised to "
              f"{data_vocab} to cover the data (name a --preset or --set vocab_size to fix it)")
        model_cfg = model_cfg.replace(vocab_size=data_vocab)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_cfg.max_seq_len}; pass --set max_seq_len={cfg.seq_len} or a shorter --seq-len")
    if cfg.dtype is not None:
        model_cfg = model_cfg.with_compute_dtype(cfg.dtype)
    if cfg.remat is not None:
        model_cfg = model_cfg.replace(remat=cfg.remat)
    return StartPoint(kind, model_cfg, step or 0)


def _with_named_compute_fields(saved: ModelConfig, asked: ModelConfig, cfg: TrainConfig) -> ModelConfig:
    """The saved model with the compute fields ``--set`` names (dtype, moe.dtype, remat):
    they may change between runs, and a --set of one is never silently dropped. The
    layer layout (scan_layers) is that of the stored arrays and cannot change."""
    named = override_keys(cfg.model_overrides)
    if "scan_layers" in named and asked.scan_layers != saved.scan_layers:
        raise TrainError(f"--set scan_layers={str(asked.scan_layers).lower()}: the run in {cfg.out} "
                         f"stores its layers with scan_layers={str(saved.scan_layers).lower()}, which "
                         f"it keeps; drop this --set, or use another --out")
    changes = {name: getattr(asked, name) for name in ("dtype", "remat") if name in named}
    if saved.moe is not None and named & {"dtype", "moe.dtype"}:
        changes["moe"] = saved.moe.replace(dtype=asked.moe.dtype)
    return saved.replace(**changes) if changes else saved


def _check_vocab(cfg: TrainConfig, model_cfg: ModelConfig, data_vocab: int, existing: bool) -> None:
    """Token ids beyond the vocabulary of a model the user chose are an error, never a
    silent change of that model (only the unnamed default preset grows to fit)."""
    if data_vocab <= model_cfg.vocab_size:
        return
    ids = f"the data has token ids up to {data_vocab - 1}"
    if existing:
        raise TrainError(f"{ids} but the run in {cfg.out} has vocab_size {model_cfg.vocab_size}; use "
                         f"data in its vocabulary, or another --out with --set vocab_size={data_vocab}")
    if requested_model(cfg) is not None:
        named = f"preset {cfg.preset!r}" if cfg.preset else "the model asked for"
        raise TrainError(f"{ids} but {named} has vocab_size {model_cfg.vocab_size}; pass "
                         f"--set vocab_size={data_vocab}")


def preflight(cfg: TrainConfig):
    """Check --out, read the corpus and plan the start -> (corpus, StartPoint); no jax."""
    from train import data as data_lib

    kind, _ = start_kind(cfg)  # a bad --out or a --resume with nothing to resume fails before the data is read
    # text for a model that has a tokenizer is read with it, never silently as bytes
    own = run_tokenizer(cfg, kind)
    corpus = data_lib.load_corpus(cfg.data, cfg.tokenizer, min_val_tokens=cfg.seq_len + 2,
                                  run_tokenizer=own)
    if cfg.tokenizer is None and own is not None and corpus.bytes_per_token is not None:
        print(f"note: tokenizing the text with the run's tokenizer {own}; --tokenizer names another")
    start = plan_start(cfg, corpus.vocab_size)
    data_lib.BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed)  # long enough?
    data_lib.eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, 1)
    return corpus, start
