"""safetensors files written in a chosen tensor order, read back as memory maps.

The ``safetensors`` library orders tensors by dtype, then name; the serving
checkpoint needs the tensors of one expert (int8 weights *and* float32
scales) next to each other, so this module writes the (simple, documented)
format itself: 8 bytes header length, a JSON header of
``name -> {dtype, shape, data_offsets}`` padded to 8 bytes, then the data in
the order given. Any safetensors reader reads the result.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32",
          np.dtype(np.uint32): "U32", np.dtype(np.int64): "I64", np.dtype(np.float64): "F64",
          np.dtype(np.bool_): "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def write(path: Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
          ) -> dict[str, tuple[int, int]]:
    """Write ``(name, array)`` pairs in order; returns name -> absolute (start, end) byte range."""
    arrays = [(name, np.ascontiguousarray(a)) for name, a in tensors]
    header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, a in arrays:
        if a.dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, a in arrays:
            f.write(a.tobytes())
    return {name: (start + info["data_offsets"][0], start + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


class TensorFileError(ValueError):
    """A safetensors file is truncated or its header is malformed."""


class MappedFile:
    """Zero-copy numpy views of the tensors of one safetensors file (one read-only mmap).

    The header is checked on opening (a JSON object; every tensor a known dtype
    whose byte range matches its shape and lies inside the file), so a truncated
    or damaged file is a :class:`TensorFileError` naming it, not a bad view later.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            file_size = self.path.stat().st_size
            size = int.from_bytes(f.read(8), "little")
            if file_size < 8 or size > file_size - 8:
                raise TensorFileError(f"{self.path}: truncated ({file_size} bytes, shorter than its header)")
            try:
                header = json.loads(f.read(size))
            except ValueError as err:
                raise TensorFileError(f"{self.path}: the safetensors header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", {})
        self.data_start = 8 + size
        self.header = header
        for name, info in header.items():
            self._check(name, info, file_size - self.data_start)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _check(self, name: str, info, data_size: int) -> None:
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                  f"{json.dumps(info)[:120]}") from None
        if min(shape, default=0) < 0 or end - begin != dtype.itemsize * int(np.prod(shape)) or begin < 0:
            raise TensorFileError(f"{self.path}: tensor {name!r}: bytes [{begin}, {end}) do not hold "
                                  f"shape {shape} of {info['dtype']}")
        if end > data_size:
            raise TensorFileError(f"{self.path}: truncated: tensor {name!r} ends at data byte {end}, "
                                  f"the file holds {data_size}")

    def names(self) -> list[str]:
        return list(self.header)

    def byte_range(self, name: str) -> tuple[int, int]:
        begin, end = self.header[name]["data_offsets"]
        return self.data_start + begin, self.data_start + end

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = self.byte_range(name)
        return self._map[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
