"""Checkpoint I/O with orbax.

Model directory: ``config.json`` and the model's variables (parameters and
non-trained state such as router biases)::

    DIR/config.json     ModelConfig (moejax.config.config_to_dict)
    DIR/model/          orbax checkpoint of nnx.state(model) as a pure dict

Train states: an orbax ``CheckpointManager`` over ``DIR/<step>/`` with two
items, ``state`` (any pytree of arrays: parameters, optimizer state, ...) and
``meta`` (JSON). Saves are asynchronous and atomic: orbax writes into a
temporary directory and renames it when complete, so a crash mid-save leaves
the previous step as the latest.

Integrity: once orbax has finalized a directory (a model's ``model/``, a
train state's ``<step>/``), :func:`seal` records every file's size and
SHA-256 in ``MANIFEST`` inside it. Restoring checks that record first, so a
truncated, emptied, removed or altered file is reported as
:class:`DamagedCheckpointError` naming the file, never as a TensorStore
traceback or silently wrong values; a directory without a record (a process
killed between finalize and seal) is checked by restoring it, and any failure
to read it is the same error. A checkpoint whose arrays have other shapes
than the model's is :class:`ShapeMismatchError` instead: that is a different
model, not damage.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moejax.config import ModelConfig, config_to_dict, read_config_file
from moejax.model import Transformer

MANIFEST = "moejax_manifest.json"


class DamagedCheckpointError(ValueError):
    """A checkpoint directory cannot be read back as it was written (the message names why)."""


class ShapeMismatchError(ValueError):
    """A readable checkpoint whose tree or array shapes differ from the expected model."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST))


def seal(directory: str | Path) -> None:
    """Record the size and SHA-256 of every file under a finalized checkpoint directory
    (written atomically; called once orbax has finished writing it)."""
    directory = Path(directory)
    record = {str(p.relative_to(directory)): [p.stat().st_size, _digest(p)] for p in _files(directory)}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": record}, indent=0))
    tmp.replace(directory / MANIFEST)


def is_sealed(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def verify(directory: str | Path) -> bool:
    """Check ``directory`` against its manifest: True when it matches, False when it has
    none (unverifiable); raises DamagedCheckpointError naming the first bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DamagedCheckpointError(f"{directory} is missing or not a directory")
    if not is_sealed(directory):
        return False
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        expected = {name: (int(size), str(digest)) for name, (size, digest) in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpointError(f"{directory / MANIFEST} is unreadable ({err})") from None
    for name, (size, digest) in expected.items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpointError(f"{path} is missing")
        if path.stat().st_size != size:
            raise DamagedCheckpointError(f"{path} has {path.stat().st_size} bytes, {size} when saved")
        if _digest(path) != digest:
            raise DamagedCheckpointError(f"{path} does not match its checksum recorded at save")
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).split(" See full TensorStore details", 1)[0]  # the rest is a spec dump
    lines = text.strip().splitlines()
    return (lines[0][:200] if lines else "") or type(err).__name__


def _read_checked(directory: Path, read):
    """``read()`` a checkpoint after verifying ``directory``; failures to read become
    DamagedCheckpointError (ShapeMismatchError passes through)."""
    verify(directory)
    try:
        return read()
    except (ShapeMismatchError, DamagedCheckpointError):
        raise
    except Exception as err:  # noqa: BLE001 - orbax/TensorStore raise plain Exception, JSON, Key...
        _silence_abandoned_reads()
        raise DamagedCheckpointError(f"{directory} cannot be read ({type(err).__name__}: "
                                     f"{_first_line(err)})") from None


_ABANDONED_READ = "_read_array_index_and_device_put"


def _silence_abandoned_reads() -> None:
    """A failed orbax restore leaves its other array reads behind as coroutines whose
    errors Python prints, each with a traceback and a TensorStore spec, whenever they
    are finalized (often at exit). The error that matters has been raised; from now on
    this process drops those reports, and only those."""
    previous = sys.unraisablehook
    if getattr(previous, "_moejax_filter", False):
        return

    def hook(unraisable):
        if _ABANDONED_READ not in repr(unraisable.object):
            previous(unraisable)
    hook._moejax_filter = True
    sys.unraisablehook = hook
    gc.collect()


def save_config(directory: str | Path, cfg: ModelConfig) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2))
    tmp.replace(directory / "config.json")  # atomic: never a half-written config


def load_config(directory: str | Path) -> ModelConfig:
    """``DIR/config.json`` (see ``moejax.config.read_config_file`` for its errors)."""
    return read_config_file(Path(directory) / "config.json")


def save_model(directory: str | Path, model: Transformer, cfg: ModelConfig) -> None:
    """Write config.json and the model variables (orbax writes atomically)."""
    directory = Path(directory).absolute()
    save_config(directory, cfg)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "model", state, force=True)
    if jax.process_index() == 0:
        seal(directory / "model")  # the context exit waited for orbax to finalize


def load_model(directory: str | Path, *, dtype: str | None = None) -> tuple[Transformer, ModelConfig]:
    """Build the model from config.json and restore its variables onto this process's
    first device, whatever mesh saved them (``sharding.shard_model`` places it on one).

    Raises FileNotFoundError (no config.json), ValueError (an unreadable
    config.json), DamagedCheckpointError (``model/`` damaged, naming the file)
    or ShapeMismatchError (``model/`` holds another model than config.json)."""
    directory = Path(directory).absolute()
    cfg = load_config(directory)
    if dtype is not None:
        cfg = cfg.with_compute_dtype(dtype)
    # An abstract model: building a real one first would run (and compile) every
    # initializer only to overwrite the result.
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    # Onto this process's first device, as a freshly built model: without a target
    # sharding orbax restores the saving mesh's layout, which fails (as a "topology
    # mismatch") wherever the device count differs, e.g. a --mesh run exported on one device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nnx.to_pure_dict(abstract_state))
    state = restore_model_variables(directory, abstract)
    nnx.replace_by_pure_dict(abstract_state, state)
    return nnx.merge(graphdef, abstract_state), cfg


def train_state_manager(directory: str | Path, *, keep: int, async_save: bool = True
                        ) -> ocp.CheckpointManager:
    """A manager of train-state checkpoints under ``directory`` that keeps the last ``keep``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _path_key(path) -> str:
    # dict keys, sequence indices and named-tuple fields all become plain names, the
    # way orbax stores them
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_tree_shapes(stored, abstract) -> None:
    """Raise ShapeMismatchError naming the first leaf whose path or shape differs between a
    checkpoint's metadata tree and the expected abstract tree (before any array is read)."""
    stored = getattr(stored, "tree", stored)
    have = {_path_key(p): tuple(getattr(leaf, "shape", ()))
            for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {_path_key(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = [f"{k}: stored {have[k]} vs expected {want[k]}"
                for k in want if k in have and have[k] != want[k]]
    problems += [f"{k}: missing from the checkpoint" for k in want if k not in have]
    problems += [f"{k}: not in the model" for k in have if k not in want]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShapeMismatchError(f"{problems[0]}{more}")


def save_train_state(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Start saving ``state`` (pytree) and ``meta`` (JSON) as ``step``; returns once the
    arrays are copied, so the caller may donate them to the next step."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restore ``step`` into the structure, shapes, dtypes and shardings of
    ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct``) -> (state, meta).
    A checkpoint of another shape raises ShapeMismatchError before anything is
    read; a damaged one DamagedCheckpointError (see the module doc)."""
    def read():
        check_tree_shapes(manager.item_metadata(step)["state"], abstract_state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        if not isinstance(restored["meta"], dict):
            raise ValueError(f"meta is {type(restored['meta']).__name__}, not a JSON object")
        return restored["state"], restored["meta"]
    return _read_checked(Path(manager.directory) / str(step), read)


def seal_finished_steps(manager: ocp.CheckpointManager) -> None:
    """Seal every step orbax has finished (waits for an async save in flight)."""
    manager.wait_until_finished()
    if jax.process_index() != 0:
        return
    for step in manager.all_steps():
        path = Path(manager.directory) / str(step)
        if path.is_dir() and not is_sealed(path):
            seal(path)


def restore_model_variables(directory: str | Path, abstract_state):
    """The variables of a model directory (``DIR/model``) restored into ``abstract_state``
    (a pure dict of ``jax.ShapeDtypeStruct``, shardings allowed): no model is built."""
    path = Path(directory).absolute() / "model"

    def read():
        with ocp.StandardCheckpointer() as ckptr:
            check_tree_shapes(ckptr.metadata(path).item_metadata, abstract_state)
            return ckptr.restore(path, abstract_state)
    return _read_checked(path, read)
