"""Corpora and batches.

1. Text (the default corpus, a file, a directory or a glob) is read as bytes:
   a byte-level vocabulary of 256, or token ids from a Hugging Face
   ``tokenizer.json`` when one is given.
2. Files are split deterministically into train and validation by a hash of
   their path (``crc32 % 20 == 0`` -> validation, about 5%); a single file or
   array, or files whose validation share is shorter than one window, is
   split at its last 5% instead.
3. Batches are random windows whose offsets are a pure function of
   ``(seed, step)``: a resumed run draws exactly the batches it would have
   drawn, and each host of a multi-host run takes its own rows of the global
   batch.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.config import TrainError

BYTE_VOCAB = 256
VAL_EVERY = 20          # one file in 20 goes to validation
VAL_FRACTION = 0.05     # tail split of a single file or array
ARRAY_SUFFIXES = (".npy", ".bin")


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray               # [N] token ids
    val: np.ndarray                 # [M] token ids
    vocab_size: int                 # smallest vocabulary that covers the ids
    bytes_per_token: float | None   # validation bytes per token (None: unknown)
    description: str
    tokenizer: str | None = None    # absolute path of the tokenizer.json of the ids (None: bytes/unknown)

    def fingerprint(self) -> str:
        head = zlib.crc32(np.ascontiguousarray(self.train[:1 << 20]).tobytes())
        return f"{len(self.train)}:{len(self.val)}:{self.vocab_size}:{head:08x}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the running interpreter's standard library (no site-packages)."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in stdlib_root().rglob("*.py")
                  if p.is_file() and not skip.intersection(p.parts))


def resolve_data_files(spec: str) -> list[Path]:
    """A file, a directory (every non-hidden file under it) or a glob -> sorted files."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise TrainError(f"--data {spec!r}: the directory holds no files")
        return sorted(files)
    if globlib.has_magic(spec):
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise TrainError(f"--data {spec!r}: the glob matches no files")
        return files
    if path.exists():  # a FIFO, a socket, a device: reading could block or never end
        raise TrainError(f"--data {spec!r} is not a regular file, a directory or a glob")
    raise TrainError(f"--data {spec!r}: no such file or directory")


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Hash split by path relative to the common root: stable when files are added."""
    if len(files) < 2:
        return files, []
    root = _common_root(files)
    is_val = [zlib.crc32(str(f.relative_to(root)).encode()) % VAL_EVERY == 0 for f in files]
    val = [f for f, v in zip(files, is_val) if v]
    train = [f for f, v in zip(files, is_val) if not v]
    return (train, val) if train and val else (files, [])


def _common_root(files: list[Path]) -> Path:
    parts = list(files[0].parent.parts)
    for f in files[1:]:
        common = 0
        for a, b in zip(parts, f.parent.parts):
            if a != b:
                break
            common += 1
        parts = parts[:common]
    return Path(*parts) if parts else Path("/")


def _tail_split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = len(tokens) - max(1, int(len(tokens) * VAL_FRACTION))
    return tokens[:cut], tokens[cut:]


class _TextEncoder:
    """Bytes -> token ids: identity over bytes, or a Hugging Face tokenizer."""

    def __init__(self, tokenizer_path: str | None):
        self.tokenizer, self.path = None, None
        if tokenizer_path is not None:
            path = Path(tokenizer_path)
            if not path.is_file():
                what = "is not a file" if path.exists() else "no such file"
                raise TrainError(f"--tokenizer {tokenizer_path!r}: {what}")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise TrainError("--tokenizer needs the 'tokenizers' package: "
                                 "pip install 'moejax[train]'") from None
            try:
                self.tokenizer, self.path = Tokenizer.from_file(str(path)), str(path.absolute())
            except Exception as err:  # the tokenizers library raises plain Exception
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise TrainError(f"--tokenizer {tokenizer_path!r}: not a tokenizer.json ({reason})") from None

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB if self.tokenizer is None else self.tokenizer.get_vocab_size()

    def encode(self, blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0,), np.int32)
        if self.tokenizer is None:
            return np.frombuffer(b"".join(blobs), np.uint8)
        texts = [b.decode("utf-8", errors="replace") for b in blobs]
        ids = [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(texts)]
        return np.concatenate(ids)


def _read(files: list[Path]) -> list[bytes]:
    blobs = []
    for f in files:
        try:
            blobs.append(f.read_bytes())
        except OSError as err:
            raise TrainError(f"--data: cannot read {str(f)!r} ({err.strerror or err})") from None
    return blobs


def load_text(files: list[Path], encoder: _TextEncoder, description: str,
              min_val_tokens: int = 1) -> Corpus:
    train_files, val_files = split_files(files)
    train_blobs, val_blobs = _read(train_files), _read(val_files)
    if sum(map(len, train_blobs)) + sum(map(len, val_blobs)) == 0:
        raise TrainError(f"--data {description!r} is empty (0 bytes)")
    train, val = encoder.encode(train_blobs), encoder.encode(val_blobs)
    if len(val) < max(min_val_tokens, 1):
        # one file, a hash split that left one side empty, or validation files too short
        # for one window: the tail of the training files then those is the validation split
        train = np.concatenate([train, val]).astype(train.dtype)
        total_bytes, total_tokens = sum(map(len, train_blobs)) + sum(map(len, val_blobs)), len(train)
        train, val = _tail_split(train)
    else:
        total_bytes, total_tokens = sum(map(len, val_blobs)), len(val)
    return Corpus(train, val, encoder.vocab_size, total_bytes / max(total_tokens, 1), description,
                  encoder.path)


def load_array(path: Path) -> Corpus:
    """Pre-tokenized ids: ``.npy`` (1-D integer array) or ``.bin`` (raw uint16, nanoGPT)."""
    try:
        tokens = (np.load(path, mmap_mode="r") if path.suffix == ".npy"
                  else np.memmap(path, dtype=np.uint16, mode="r"))
    except (ValueError, OSError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise TrainError(f"--data {str(path)!r}: cannot read token array ({reason})") from None
    if not isinstance(tokens, np.ndarray):  # an .npz archive under a .npy name
        raise TrainError(f"--data {str(path)!r}: expected a .npy array, got {type(tokens).__name__}")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TrainError(f"--data {str(path)!r}: expected a 1-D integer array, got "
                         f"{tokens.dtype} of shape {tokens.shape}")
    if len(tokens) == 0:
        raise TrainError(f"--data {str(path)!r} is empty (0 tokens)")
    if tokens.min() < 0:
        raise TrainError(f"--data {str(path)!r}: token ids must be >= 0")
    if tokens.max() >= 2 ** 31:  # batches are int32
        raise TrainError(f"--data {str(path)!r}: token id {int(tokens.max())} does not fit int32")
    train, val = _tail_split(np.asarray(tokens))
    return Corpus(train, val, int(tokens.max()) + 1, None, str(path))


def load_corpus(data: str | None, tokenizer: str | None = None, min_val_tokens: int = 1,
                run_tokenizer: str | None = None) -> Corpus:
    """The training corpus named by ``--data`` (default: the Python standard library).
    Text whose hash-split validation files hold fewer than ``min_val_tokens`` tokens
    (``--seq-len + 2``: one window) is split at its tail instead. ``run_tokenizer``
    (the model's own) reads text when ``tokenizer`` (--tokenizer) is None; token
    arrays are taken to be in its vocabulary."""
    if data is None:
        files, description = stdlib_files(), f"Python standard library ({stdlib_root()})"
    else:
        if not data.strip():
            raise TrainError("--data is empty; give a file, a directory or a glob")
        files, description = resolve_data_files(data), data
        if len(files) == 1 and files[0].suffix in ARRAY_SUFFIXES:
            if tokenizer is not None:
                raise TrainError("--tokenizer applies to text; a .npy/.bin array is already tokenized")
            return dataclasses.replace(load_array(files[0]), tokenizer=run_tokenizer)
    return load_text(files, _TextEncoder(tokenizer or run_tokenizer), description, min_val_tokens)


class BatchSampler:
    """Random training windows; the offsets depend only on ``(seed, step)``."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise TrainError(f"--batch-size {batch_size} must divide evenly over "
                             f"{process_count} hosts")
        if len(tokens) < seq_len + 2:
            raise TrainError(f"the training split has {len(tokens)} tokens, fewer than "
                             f"--seq-len + 2 = {seq_len + 2}; use more data or a shorter --seq-len")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        rows = batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        """This host's rows of the global batch at ``step``: [rows, seq_len + 1] int32."""
        return windows(self.tokens, self.offsets(step)[self.rows], self.seq_len)


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> np.ndarray:
    index_BS = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[index_BS], np.int32)


def eval_batches(val: np.ndarray, batch_size: int, seq_len: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """Fixed validation windows spread evenly over the split (same at every eval)."""
    if len(val) < seq_len + 2:
        raise TrainError(f"the validation split has {len(val)} tokens, fewer than --seq-len + 2 "
                         f"= {seq_len + 2}; use more data or a shorter --seq-len")
    count = batch_size * num_batches
    offsets = np.linspace(0, len(val) - seq_len - 1, count).astype(np.int64)
    rows = batch_size // process_count
    return [windows(val, b[process_index * rows:(process_index + 1) * rows], seq_len)
            for b in offsets.reshape(num_batches, batch_size)]
