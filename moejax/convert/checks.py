"""What the converter checks before it reads a tensor (plain Python: no jax, no numpy).

1. ``read_hf_config``: ``config.json`` must be a JSON object of a supported
   family whose every option moejax reproduces (``UnsupportedConfigError``
   otherwise, naming the option).
2. ``safetensors_files`` / ``read_header``: the index (if any) and every
   shard are checked structurally: an 8-byte header length that fits the
   file, a JSON header, known dtypes, byte ranges that match each tensor's
   shape and lie inside the file. A truncated, empty or garbage file is a
   ``DamagedFileError`` naming the file, never a reader crash or silently
   short data. (Flipped bits inside a tensor cannot be seen: safetensors
   stores no checksums.)
3. ``check_out``: the output must be a directory that can be written and
   holds nothing yet, unless ``force``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moejax.config import ConfigError, ModelConfig
from moejax.convert.families import Family, family_for_hf
from moejax.convert.hf_config import HFConfig, UnsupportedConfigError, read_fp8_block
from moejax.validate import check_writable_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
               "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class DamagedFileError(ValueError):
    """A checkpoint file that is not what its format promises (the message names it)."""


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise DamagedFileError(f"{path} is not valid JSON ({_first_line(err)}); is {what} damaged?") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def read_hf_config(path: str | Path) -> tuple[ModelConfig, Family, dict[str, Any]]:
    """config.json -> (ModelConfig, family, raw dict); unsupported options raise."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory" if directory.exists()
                                else f"no such directory: {directory}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    raw = _json_file(config_path, "config.json")
    if not isinstance(raw, dict):
        raise DamagedFileError(f"{config_path} holds a JSON {type(raw).__name__}, not an object")
    family = family_for_hf(raw)
    hf = HFConfig(raw)
    try:
        cfg = family.read(hf)
        read_fp8_block(hf)
    except UnsupportedConfigError:
        raise
    except (ConfigError, TypeError, ValueError, AttributeError) as err:  # e.g. "hidden_size": "big"
        raise UnsupportedConfigError(f"{config_path}: {_first_line(err)}") from None
    hf.check_all_used()
    return cfg, family, raw


def safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index or the single file; every file's header checked."""
    index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_path.is_file():
        index = _json_file(index_path, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise DamagedFileError(f"{index_path} has no weight_map of tensor name -> file name")
        file_of = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(file_of.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{index_path} names {shard.name}, which is missing")
            listed = {n for n, f in file_of.items() if f == shard}
            missing = sorted(listed - set(read_header(shard)[0]))
            if missing:
                raise DamagedFileError(f"{shard} lacks tensor {missing[0]!r} that {INDEX_FILE} puts there")
        return file_of
    if single_path.is_file():
        return {name: single_path for name in read_header(single_path)[0]}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (only safetensors "
                            f"checkpoints are read; convert .bin files with transformers first)")


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor table without __metadata__, byte offset of the data) of a safetensors file,
    checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
            raise DamagedFileError(f"{path} is not a safetensors file or is truncated ({size} bytes, "
                                   f"header length {length})")
        raw = f.read(length)
    try:
        table = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DamagedFileError(f"{path}: the safetensors header is not JSON (damaged file?)") from None
    if not isinstance(table, dict):
        raise DamagedFileError(f"{path}: the safetensors header is not a JSON object")
    table.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, info in table.items():
        _check_entry(path, name, info, data_bytes)
    return table, 8 + length


def _check_entry(path: Path, name: str, info: Any, data_bytes: int) -> None:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        count = math.prod(int(n) for n in shape)
    except (KeyError, TypeError, ValueError):
        raise DamagedFileError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if dtype not in DTYPE_BYTES:
        raise DamagedFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != count * DTYPE_BYTES[dtype]:
        raise DamagedFileError(f"{path}: tensor {name!r} byte range {begin}..{end} does not hold "
                               f"{dtype} {list(shape)}")
    if begin < 0 or end > data_bytes:
        raise DamagedFileError(f"{path} is truncated: tensor {name!r} ends at data byte {end}, "
                               f"the file holds {data_bytes}")


def check_out(out: Path, *, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """``--out`` must be writable, not a source, and empty (or ``force``)."""
    if any(out.absolute().resolve() == s.absolute().resolve() for s in sources):
        raise ValueError(f"--out {str(out)!r} is the directory being converted; choose another")
    check_writable_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        held = ("a training run" if (out / "checkpoints").is_dir() else
                "a model" if (out / "config.json").is_file() else "files")
        raise ValueError(f"--out {str(out)!r} already holds {held}; pass --force to overwrite "
                         f"what the conversion writes there, or use a new directory")
