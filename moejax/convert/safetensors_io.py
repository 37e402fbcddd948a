"""Lazy safetensors I/O: one tensor in memory at a time.

Reading: :class:`TensorReader` opens a single ``model.safetensors`` or a
sharded checkpoint (``model.safetensors.index.json`` naming the shard of each
tensor) and returns one tensor per call as a numpy array, read through
``safetensors.safe_open`` (memory-mapped), so a checkpoint never sits in
memory as a whole. bfloat16 and float8 tensors come back as float32
(block-quantized FP8 weights dequantized with their ``_scale_inv``).

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

from moejax.convert.checks import (FLOAT_DTYPES, INDEX_FILE, SINGLE_FILE, DamagedFileError,
                                   read_header, safetensors_files)


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("moejax.convert needs safetensors: pip install 'moejax[convert]'") from err
    return safe_open(str(path), framework="np")


# numpy has no bfloat16 / float8; safetensors' numpy reader refuses them, so
# those are read straight from the file's byte ranges with ml_dtypes types.
_NUMPY_DTYPES = {"F64", "F32", "F16"}


def _ml_dtype(name: str):
    import ml_dtypes  # imported on first use: it is slow to load
    return {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
            "F8_E5M2": ml_dtypes.float8_e5m2}[name]


class TensorReader:
    """Name -> tensor access over one or several safetensors files, read lazily.

    Every file's header is checked against the file when the reader opens
    (``moejax.convert.checks``): damaged files raise DamagedFileError naming
    the file. Tensors that are not floating point are refused by name.
    """

    def __init__(self, directory: str | Path, *, fp8_block: tuple[int, int] | None = None):
        self.directory = Path(directory)
        self.fp8_block = fp8_block
        self._file_of = safetensors_files(self.directory)
        self.last_name: str | None = None   # the tensor read last (for error messages)
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[dict, int]] = {}
        self.read_names: set[str] = set()

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not found in the checkpoint at {self.directory}")
        path = self._file_of[name]
        if path not in self._handles:
            try:
                self._handles[path] = _safe_open(path).__enter__()
            except Exception as err:  # noqa: BLE001 - SafetensorError derives from Exception only
                raise DamagedFileError(f"{path} cannot be opened as safetensors ({err})") from None
        return self._handles[path]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 numpy array (read from the memory map).

        Block-quantized FP8 weights (a ``name + '_scale_inv'`` tensor beside
        them) come back dequantized: each [bo, bi] tile times its scale.
        """
        array = self._read(name)
        scale_name = f"{name}_scale_inv"
        if self.fp8_block is not None and scale_name in self._file_of:
            block_out, block_in = self.fp8_block
            scale = self._read(scale_name)
            rows, cols = array.shape
            array = array * np.repeat(np.repeat(scale, block_out, axis=0), block_in, axis=1)[:rows, :cols]
        return array

    def _read(self, name: str) -> np.ndarray:
        dtype = self._handle(name).get_slice(name).get_dtype()
        self.read_names.add(name)
        self.last_name = name
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} in {self._file_of[name].name} has dtype {dtype}; "
                             f"model weights must be floating point ({', '.join(sorted(FLOAT_DTYPES))})")
        if dtype in _NUMPY_DTYPES:
            return np.asarray(self._handle(name).get_tensor(name), dtype=np.float32)
        path = self._file_of[name]
        if path not in self._headers:
            self._headers[path] = read_header(path)
        table, data_start = self._headers[path]
        begin, end = table[name]["data_offsets"]
        raw = np.memmap(path, dtype=_ml_dtype(dtype), mode="r", offset=data_start + begin,
                        shape=tuple(table[name]["shape"]))
        if raw.nbytes != end - begin:
            raise ValueError(f"tensor {name!r}: header byte range does not match its shape and dtype")
        return raw.astype(np.float32)

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
