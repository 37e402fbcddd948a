"""Serving checkpoints: ``python -m serve export`` writes one, ``read_checkpoint`` maps it.

Layout of DIR (self-describing; parameters only, no optimizer state)::

    DIR/manifest.json          format, version, dtype, quantization, files, tokenizer,
                               and for every MoE layer the byte range of each expert
    DIR/config.json            the ModelConfig (moejax.config.config_to_dict)
    DIR/model.safetensors      every variable but the routed experts ("layers.0.attn.wq", ...)
    DIR/experts.safetensors    routed experts, expert-major: all tensors of expert e of
                               layer i ("layers.i.ffn.experts.e.w_gate", ...) lie next to
                               each other, so one expert is one contiguous read
    DIR/tokenizer.json         when the model came with one (else token ids are bytes)

Steps of an export: 1. load the model directory (``config.json`` + ``model/``,
written by ``python -m train`` and ``python -m moejax.convert``) or, for a run
that has only checkpoints, the parameters of its latest checkpoint; 2. optionally
quantize the routed experts to int8 (``moejax.quantize_experts``); 3. cast
matrices to the serving dtype (norms, router and embedding stay float32);
4. write into a temporary directory and rename it into place.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moejax import checkpoint as mckpt
from moejax.experts import quantize_experts
from moejax.config import ConfigError, ModelConfig, config_from_dict, config_to_dict
from moejax.layer_stack import unstack_layers
from moejax.model import Transformer
from serve import tensorfile
from serve.chat import ChatTemplate
from serve.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, eos_from_files, special_tokens_in

FORMAT, VERSION = "moejax-serving", 1
SERVING_DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = (None, "int8")


class ExportError(ValueError):
    """The source cannot be exported, or the destination cannot be written."""


def key_of(path) -> str:
    """A pure-dict path as a dotted name: ('layers', 0, 'attn', 'wq') -> 'layers.0.attn.wq'."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def expert_split(path_key: str) -> tuple[str, str] | None:
    """('layers.3.ffn.experts', 'w_gate') for a routed-expert leaf, else None."""
    head, sep, tail = path_key.partition(".experts.")
    return (head + ".experts", tail) if sep else None


# ---------------------------------------------------------------- reading the source

def load_source(run: Path) -> tuple[Transformer, ModelConfig]:
    """The model of a model directory, or of the latest checkpoint of a training run."""
    if not (run / "config.json").is_file():
        raise ExportError(f"--ckpt {run}: no config.json (expected a training run or a model directory)")
    try:
        if (run / "model").is_dir():
            return mckpt.load_model(run)
        return _from_latest_checkpoint(run)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        if isinstance(err, ExportError):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ExportError(f"--ckpt {run}: cannot read the model ({first})") from None


def _from_latest_checkpoint(run: Path) -> tuple[Transformer, ModelConfig]:
    directory = run / "checkpoints"
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise ExportError(f"--ckpt {run}: neither a model (model/) nor checkpoints (checkpoints/<step>/)")
    cfg = mckpt.load_config(run)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with mckpt.train_state_manager(directory, keep=10**6, async_save=False) as manager:
        stored = manager.item_metadata(steps[-1])["state"]
        stored = getattr(stored, "tree", stored)
        # the optimizer state is restored as stored (shapes from its metadata) and dropped
        like = lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)  # noqa: E731
        target = {"params": jax.tree.map(like, nnx.to_pure_dict(params)),
                  "nonparam": jax.tree.map(like, nnx.to_pure_dict(rest)),
                  "opt_state": jax.tree.map(like, stored["opt_state"])}
        mckpt.check_tree_shapes(stored, target)
        restored = manager.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    nnx.replace_by_pure_dict(params, restored["state"]["params"])
    nnx.replace_by_pure_dict(rest, restored["state"]["nonparam"])
    return nnx.merge(graphdef, params, rest), cfg


def find_tokenizer(run: Path, vocab_size: int) -> tuple[dict, Path | None]:
    """(manifest entry, file to copy) for the model's tokenizer; bytes when it has none."""
    candidates = [run / "tokenizer" / "tokenizer.json", run / "tokenizer.json"]
    train_config = run / "train_config.json"
    if train_config.is_file():
        named = json.loads(train_config.read_text()).get("tokenizer")
        if named:
            if not Path(named).is_file():
                raise ExportError(f"{train_config} names tokenizer {named!r}, which does not exist")
            candidates.insert(0, Path(named))
    for path in candidates:
        if path.is_file():
            try:
                tok = HFTokenizer(path)
            except TokenizerError as err:
                raise ExportError(str(err)) from None
            if tok.vocab_size > vocab_size:
                raise ExportError(f"{path}: {tok.vocab_size} tokens, more than the model's "
                                  f"vocab_size {vocab_size}")
            entry = {"kind": "hf", "file": "tokenizer.json", "eos_token_id": eos_from_files(path.parent, tok)}
            # with or without a template: one given later (--chat-template) renders them too
            special = special_tokens_in(path.parent)
            if special:
                entry["special_tokens"] = special
            try:
                chat = ChatTemplate.from_tokenizer_dir(path.parent)
            except TokenizerError as err:
                raise ExportError(f"{path.parent}: {err}") from None
            if chat is not None:     # its special tokens are the entry's
                entry["chat_template"] = chat.source
            return entry, path
    if vocab_size < ByteTokenizer.vocab_size:
        raise ExportError(f"--ckpt {run}: no tokenizer.json and vocab_size {vocab_size} < 256, "
                          f"so bytes cannot be the tokens")
    return {"kind": "bytes"}, None


# ---------------------------------------------------------------- writing

def _serving_array(path_key: str, leaf, dtype: str, quantized: bool) -> np.ndarray:
    """A variable as stored: matrices in the serving dtype, precision-critical ones float32."""
    array = np.asarray(leaf)
    keep = (array.ndim < 2 or array.dtype != np.float32 or path_key == "embed" or ".router." in path_key
            or (quantized and expert_split(path_key) is not None))
    if dtype == "bfloat16" and not keep:
        return array.astype(ml_dtypes.bfloat16)
    return array


def export(run: str | Path, out: str | Path, *, dtype: str = "float32", quantize: str | None = None,
           force: bool = False) -> dict:
    """Write the serving checkpoint of ``run`` to ``out``; returns the manifest."""
    run, out = Path(run), Path(out)
    if dtype not in SERVING_DTYPES:
        raise ExportError(f"--dtype must be one of {SERVING_DTYPES}, got {dtype!r}")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize must be int8 (or absent), got {quantize!r}")
    if out.exists() and not force:
        raise ExportError(f"--out {out} already exists (pass --force to replace it)")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        # --force replaces --out: that must never delete the source
        raise ExportError("--out must differ from --ckpt and must not be a folder that holds it")
    model, cfg = load_source(run)
    tokenizer_entry, tokenizer_file = find_tokenizer(run, cfg.vocab_size)
    if quantize == "int8":   # weight-only int8 routed experts, per output channel (gmm_int8)
        model = quantize_experts(model)
    pure = unstack_layers(nnx.to_pure_dict(nnx.state(model)), cfg)
    # serving runs unrolled layers (one experts object per layer, swappable), no remat
    cfg = cfg.with_compute_dtype(dtype).replace(scan_layers=False, remat="none")
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    arrays = {key_of(p): _serving_array(key_of(p), leaf, dtype, quantize is not None) for p, leaf in leaves}

    tmp = out.parent / f".{out.name}.tmp-{time.time_ns()}"
    tmp.mkdir(parents=True)
    try:
        manifest = _write_dir(tmp, cfg, arrays, dtype, quantize, tokenizer_entry, tokenizer_file, run)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _write_dir(tmp: Path, cfg: ModelConfig, arrays: dict, dtype: str, quantize: str | None,
               tokenizer_entry: dict, tokenizer_file: Path | None, run: Path) -> dict:
    rest = [(k, a) for k, a in arrays.items() if expert_split(k) is None]
    tensorfile.write(tmp / "model.safetensors", rest, {"format": FORMAT})
    groups: dict[str, list[str]] = {}
    for key in arrays:
        split = expert_split(key)
        if split:
            groups.setdefault(split[0], []).append(split[1])
    experts_entry, ordered = {}, []
    for prefix, names in groups.items():
        num_experts = arrays[f"{prefix}.{names[0]}"].shape[0]
        for e in range(num_experts):
            ordered += [(f"{prefix}.{e}.{n}", arrays[f"{prefix}.{n}"][e]) for n in names]
        experts_entry[prefix] = {"num_experts": num_experts, "tensors": names}
    ranges = tensorfile.write(tmp / "experts.safetensors", ordered, {"format": FORMAT})
    for prefix, entry in experts_entry.items():
        entry["byte_ranges"] = [[ranges[f"{prefix}.{e}.{entry['tensors'][0]}"][0],
                                 ranges[f"{prefix}.{e}.{entry['tensors'][-1]}"][1]]
                                for e in range(entry["num_experts"])]
    (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    if tokenizer_file is not None:
        shutil.copy2(tokenizer_file, tmp / "tokenizer.json")
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "quantize": quantize,
                "source": str(run.resolve()), "config": "config.json",
                "files": {"model": "model.safetensors", "experts": "experts.safetensors"},
                "tokenizer": tokenizer_entry, "experts": experts_entry}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------- reading a serving checkpoint

def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ExportError(f"--model {directory}: no manifest.json (not a serving checkpoint; "
                          f"make one with python -m serve export)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path}: not JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ExportError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                          f"expected {FORMAT!r} version {VERSION}")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    """The fields the readers use, with their types (a damaged manifest names its field)."""
    def need(ok, field, what):
        if not ok:
            raise ExportError(f"{path}: field {field!r} must be {what}, got {json.dumps(manifest.get(field))[:80]}")

    def is_name(v):
        return isinstance(v, str) and v != ""

    files = manifest.get("files")
    need(is_name(manifest.get("config")), "config", "a file name")
    need(isinstance(files, dict) and is_name(files.get("model")) and is_name(files.get("experts")), "files",
         "an object naming the 'model' and 'experts' files")
    need(isinstance(manifest.get("tokenizer"), dict), "tokenizer", "an object")
    experts = manifest.get("experts")
    need(isinstance(experts, dict) and all(
        isinstance(e, dict) and isinstance(e.get("num_experts"), int) and e["num_experts"] >= 1
        and isinstance(e.get("tensors"), list) and e["tensors"] and all(is_name(n) for n in e["tensors"])
        for e in experts.values()), "experts",
        "an object of {num_experts: int >= 1, tensors: [names]} per MoE layer")


def read_config(directory: str | Path, manifest: dict) -> ModelConfig:
    """The ModelConfig a serving checkpoint's manifest names (ExportError when it is unreadable)."""
    path = Path(directory) / manifest["config"]
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return config_from_dict(data)
    except (ValueError, TypeError, KeyError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ExportError(f"{path}: not a model config ({err})") from None


def read_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict, dict[str, np.ndarray], dict]:
    """(config, manifest, name -> array view of every non-expert variable, prefix -> stacked experts).

    Arrays are memory-mapped views; the routed experts of each layer are
    stacked back to [E, ...] (a copy) by :func:`stacked_experts`.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    cfg = read_config(directory, manifest)
    rest = tensorfile.MappedFile(directory / manifest["files"]["model"])
    experts = tensorfile.MappedFile(directory / manifest["files"]["experts"])
    return cfg, manifest, {n: rest.get(n) for n in rest.names()}, stacked_experts(experts, manifest)


def stacked_experts(experts: tensorfile.MappedFile, manifest: dict) -> dict[str, np.ndarray]:
    out = {}
    names = set(experts.names())
    for prefix, entry in manifest["experts"].items():
        for name in entry["tensors"]:
            missing = [e for e in range(entry["num_experts"]) if f"{prefix}.{e}.{name}" not in names]
            if missing:
                raise ExportError(f"{experts.path}: no tensor {prefix}.{missing[0]}.{name}, which the "
                                  f"manifest lists")
            out[f"{prefix}.{name}"] = np.stack([experts.get(f"{prefix}.{e}.{name}")
                                                for e in range(entry["num_experts"])])
    return out
