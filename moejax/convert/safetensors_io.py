"""Lazy safetensors I/O: one tensor in memory at a time.

Reading: :class:`TensorReader` opens a single ``model.safetensors`` or a
sharded checkpoint (``model.safetensors.index.json`` naming the shard of each
tensor) and returns one tensor per call as a numpy array, read through
``safetensors.safe_open`` (memory-mapped), so a checkpoint never sits in
memory as a whole. bfloat16 tensors come back as float32.

Writing: :func:`write_sharded` takes a stream of ``(name, array)`` pairs and
cuts it into shards of at most ``max_shard_bytes``, holding only the current
shard in memory; with more than one shard it writes the index file that
``transformers`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _safe_open(path: Path, framework: str = "np"):
    try:
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("moejax.convert needs safetensors: pip install 'moejax[convert]'") from err
    return safe_open(str(path), framework=framework)


# numpy has no bfloat16 / float8: those tensors are read through jax ('flax').
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


class TensorReader:
    """Name -> tensor access over one or several safetensors files, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        single_path = self.directory / SINGLE_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self._file_of = {name: self.directory / shard for name, shard in weight_map.items()}
        elif single_path.is_file():
            with _safe_open(single_path) as handle:
                self._file_of = {name: single_path for name in handle.keys()}
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory} (only safetensors "
                f"checkpoints are read; convert .bin files with transformers first)")
        self._handles: dict[tuple[Path, str], object] = {}
        self.read_names: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str, framework: str = "np"):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not found in the checkpoint at {self.directory}")
        key = (self._file_of[name], framework)
        if key not in self._handles:
            self._handles[key] = _safe_open(key[0], framework).__enter__()
        return self._handles[key]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 numpy array (read from the memory map)."""
        dtype = self._handle(name).get_slice(name).get_dtype()
        framework = "np" if dtype in _NUMPY_DTYPES else "flax"
        self.read_names.add(name)
        return np.asarray(self._handle(name, framework).get_tensor(name), dtype=np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], directory: str | Path, *,
                  max_shard_bytes: int = 2 * 1024 ** 3) -> list[str]:
    """Write ``(name, array)`` pairs as safetensors shards (+ index when > 1 shard).

    Returns the shard file names. Only one shard is held in memory at a time.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    written: list[tuple[str, list[str]]] = []
    shard_bytes, total_bytes = 0, 0

    def flush() -> None:
        shard = shards.pop()
        if not shard:
            return
        tmp_name = f"shard-{len(written):05d}.tmp"
        save_file(shard, str(directory / tmp_name), metadata={"format": "pt"})
        written.append((tmp_name, list(shard)))

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if shard_bytes and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
        total_bytes += array.nbytes
    flush()

    if len(written) == 1:
        (directory / written[0][0]).replace(directory / SINGLE_FILE)
        (directory / INDEX_FILE).unlink(missing_ok=True)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, (tmp_name, tensor_names) in enumerate(written):
        final_name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (directory / tmp_name).replace(directory / final_name)
        names.append(final_name)
        weight_map.update({t: final_name for t in tensor_names})
    (directory / SINGLE_FILE).unlink(missing_ok=True)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names
